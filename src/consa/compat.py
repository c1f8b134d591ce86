"""Keyword names that moved between the transformers versions consa supports (``>=5.17,<6``).

transformers 5.2x renamed the KV-cache keyword ``past_key_values`` to ``cache`` (the old name warns
and is due to go from forwards in 5.40), while 5.17 has no ``cache``: there a forward swallows
``cache=`` into ``**kwargs`` and silently runs without the cache. So every consa call that hands
transformers a cache takes the keyword from here, picked once from what the installed version
accepts. ``CACHE_KWARG`` is a module attribute computed on first use, so importing this module does
not import transformers' model code. (The dtype needs nothing here: every supported version takes
``dtype=``, and ``torch_dtype=`` is deprecated.)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

NEW_CACHE, OLD_CACHE = "cache", "past_key_values"

__all__ = ["CACHE_KWARG", "cache_kwarg_for", "cache_kwarg", "cache_kwargs", "output_cache"]


def cache_kwarg_for(params: Iterable[str]) -> str:
    """The cache keyword of a forward whose parameter names are ``params``."""
    return NEW_CACHE if NEW_CACHE in set(params) else OLD_CACHE


def _params(fn) -> set[str] | None:
    try:  # follows functools.wraps, so transformers' @deprecate_kwarg shows the real signature
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


@functools.cache
def _installed_cache_kwarg() -> str:
    # generate() only has **kwargs; a plain decoder's forward names the keyword the library uses
    from transformers import LlamaForCausalLM

    return cache_kwarg_for(_params(LlamaForCausalLM.forward) or ())


@functools.cache
def _class_cache_kwarg(cls: type) -> str:
    params = _params(getattr(cls, "forward", None)) or set()
    if NEW_CACHE in params or OLD_CACHE in params:
        return cache_kwarg_for(params)
    return _installed_cache_kwarg()  # forward(**kwargs) only: the library's own name


def cache_kwarg(model=None) -> str:
    """The keyword ``model``'s forward (and so its ``generate``) takes for a cache; without a model,
    the installed transformers' name. Looked up once per class."""
    return _installed_cache_kwarg() if model is None else _class_cache_kwarg(type(model))


def cache_kwargs(cache, model=None) -> dict[str, Any]:
    """``{keyword: cache}`` to splat into ``model(...)`` or ``model.generate(...)``."""
    return {cache_kwarg(model): cache}


def output_cache(out):
    """The cache a forward returned, or None. Reads the field by key/attribute without touching the
    deprecated ``ModelOutput.past_key_values`` property (it logs a warning on new versions)."""
    for name in (NEW_CACHE, OLD_CACHE):
        value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if value is not None:
            return value
    return None


def __getattr__(name: str):
    if name == "CACHE_KWARG":
        return _installed_cache_kwarg()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
