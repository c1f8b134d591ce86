"""Hybrid FA/SWA attention, bottom up: ``plan`` (what a layer runs, its KernelConfig, the key
containers) and ``masks``; the kernels (``kernels``, ``chunked``, ``split_causal``, ``triton_decode``,
``triton_prefill``) and the one selector over them (``select``); ``attend`` (a head group over held
slots) and ``cached`` (a layer over what its cache holds); the caches (``cache``: eager,
``static_cache``: preallocated); the registered ``consa`` attention and mask functions (``hybrid``).
Nothing here knows a model or an engine: caches are built from plans."""
