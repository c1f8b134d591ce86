"""``consa serve --model DIR [--allocation A]``: an OpenAI-compatible HTTP server with continuous batching
over the hybrid KV cache (consa.serving.server). Needs the ``serve`` extra: pip install "consa[serve]"."""

from __future__ import annotations

import signal
import socket
import sys

from .argtypes import positive_float, positive_int

GIB = 1 << 30


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI completions/chat API, continuous batching)",
        description="Serve MODEL (a plain model folder or a consa export) with its allocation, ALLOCATION if "
        "given (else the one an export stores, else full attention), over OpenAI's /v1/completions and "
        "/v1/chat/completions (streaming as server-sent events), /v1/models, /health and /metrics "
        "(Prometheus). Requests are batched continuously: they join and leave the running batch at "
        "every step. KV memory is allocated once: --kv-budget-gib / the KV bytes of one sequence of "
        "--max-model-len tokens gives the number of sequences held at once (at most --max-batch).",
    )
    p.add_argument("--model", required=True, help="model folder (Hugging Face format, or a consa export)")
    p.add_argument("--allocation", help="allocation JSON to apply (default: the export's own, else full attention)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", help="the model id clients name (default: the folder's name)")
    p.add_argument("--max-model-len", type=positive_int, help="tokens per sequence, prompt + new (default: the model's context)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="most sequences held at once (default: 64)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="most requests waiting for a slot; past it the server answers 429 (default: 256)")
    p.add_argument("--kv-budget-gib", type=positive_float,
                   help="KV cache memory (default: 85%% of the free GPU memory after loading; 2 GiB on CPU)")
    p.add_argument("--prefill-chunk", type=positive_int, default=2048,
                   help="prompt tokens per step, interleaved with decode steps (default: 2048)")
    p.add_argument("--idle-prefill", type=positive_int,
                   help="prompt tokens per step while nothing decodes: a prompt that fits goes in whole "
                        "(default: 4 × --prefill-chunk)")
    p.add_argument("--default-max-tokens", type=positive_int, default=16,
                   help="max_tokens of a completion that names none (default: 16, as OpenAI's)")
    p.add_argument("--shutdown-timeout", type=positive_float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish before cancelling them (default: 30)")
    p.add_argument("--eager", action="store_true", help="run decode steps eagerly (default on CUDA: replay captured graphs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: warning)")
    p.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything loads, so a busy port is one error line, not a traceback after the load."""
    from ..errors import ConsaError

    if not 0 <= port <= 65535:
        raise ConsaError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConsaError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConsaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def servable(model, model_dir, allocation_path: str | None):
    """Put fixed plans on every layer: ``allocation_path`` if given, else what the export holds (a
    head-wise export has them already, a native one stores its allocation), else full attention
    (native sliding layers kept). Returns a one-line description."""
    from ..allocation import Allocation
    from ..export import read_export
    from ..models import apply_allocation, model_shape, native_windows, plans_of

    if allocation_path:
        alloc = Allocation.load(allocation_path)
        apply_allocation(model, alloc)
        return f"allocation {allocation_path}: {alloc.num_units - alloc.num_swa}/{alloc.num_units} units FA"
    try:
        plans_of(model)
        return "the export's head-wise allocation"
    except ValueError:
        pass
    _, section, alloc = read_export(model_dir)
    if alloc is not None:
        apply_allocation(model, alloc)
        return f"the export's {section['mode']} allocation: {alloc.num_units - alloc.num_swa}/{alloc.num_units} units FA"
    native = native_windows(model)
    shape = model_shape(model)
    free = sum(w is None for w in native)
    window = max([w for w in native if w is not None], default=1)
    apply_allocation(model, Allocation.from_units([True] * free * shape.num_kv_heads, "kv_head", shape, window, native=native))
    kept = len(native) - free
    return "full attention" + (f" ({kept} native sliding layers kept)" if kept else "")


def _tokenizer(model_dir):
    from pathlib import Path

    p = Path(model_dir)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(p)


def _eos(model, tok) -> tuple[int, ...]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tok):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return tuple(sorted(int(i) for i in ids))


def run(args) -> int:
    import torch

    from ..errors import ConsaError
    from .common import check_model_dir, pick_device, pick_dtype

    try:
        import uvicorn

        from ..serving.scheduler import EngineThread, Scheduler
        from ..serving.server import App
        from ..serving.slots import slots_for_budget
    except ImportError as e:
        raise ConsaError(f"consa serve needs the serve extra ({e.name} is missing): pip install 'consa[serve]'") from None
    from ..export import load
    from ..models import plans_of, text_config

    model_dir = check_model_dir(args.model)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    sock = _listen(args.host, args.port)
    try:
        model = load(model_dir, dtype=dtype, device=str(device))
        how = servable(model, model_dir, args.allocation)
        tok = _tokenizer(model_dir)
        cfg = text_config(model)
        context = getattr(cfg, "max_position_embeddings", None) or 4096
        max_len = args.max_model_len or context
        if max_len > context:
            raise ConsaError(f"--max-model-len {max_len} exceeds the model's context of {context} tokens")
        plans = plans_of(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if args.kv_budget_gib:
            budget = int(args.kv_budget_gib * GIB)
        elif device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * 0.85)
        else:
            budget = 2 * GIB
        fit = slots_for_budget(plans, max_len, head_dim, dtype, budget)
        if fit < 1:
            from ..serving.slots import slot_elements

            need = slot_elements(plans, max_len, head_dim) * torch.empty((), dtype=dtype).element_size() / GIB
            raise ConsaError(f"a KV budget of {budget / GIB:.3g} GiB holds no sequence of {max_len} tokens (one needs "
                             f"{need:.3g} GiB): raise --kv-budget-gib or lower --max-model-len")
        slots = min(fit, args.max_batch)
        try:
            sched = Scheduler(model, num_slots=slots, max_len=max_len, prefill_tokens=args.prefill_chunk,
                              idle_prefill_tokens=max(args.idle_prefill or 4 * args.prefill_chunk, args.prefill_chunk),
                              max_queue=args.max_queue, plans=plans, graphs=False if args.eager else None)
        except ValueError as e:
            raise ConsaError(str(e)) from None
    except BaseException:
        sock.close()
        raise
    name = args.served_model_name or model_dir.resolve().name
    engine = EngineThread(sched).start()
    app = App(engine, model_name=name, tokenizer=tok, eos=_eos(model, tok), max_len=max_len,
              default_max_tokens=args.default_max_tokens)
    host, port = sock.getsockname()[:2]
    print(f"consa serve: {name} ({how}) on {device}, {slots} sequences of up to {max_len} tokens "
          f"({sched.pool.stored_bytes() / GIB:.3g} GiB KV)", flush=True)
    print(f"consa serve: listening on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app.starlette(), log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=args.log_level in ("info", "debug"))
    server = uvicorn.Server(config)
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig))  # uvicorn re-raises it after its shutdown
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
        sock.close()
    print("consa serve: stopped", file=sys.stderr, flush=True)
    return 0
