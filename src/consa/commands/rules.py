"""``consa rules``: rule-based allocations with the same SWA count as a given sparsity, or as many FA units
as a KV budget allows at the window (``--kv-budget``, the count single-window ``consa search`` uses)."""

from __future__ import annotations

from .argtypes import nonneg_int, open_fraction, positive_int


def register(sub) -> None:
    p = sub.add_parser("rules", help="write rule-based allocations (interleaved, fa_top, fa_bottom, fa_middle, random)")
    p.add_argument("--model", required=True, help="local HF model directory (only its config is read)")
    p.add_argument("--sparsity", type=open_fraction, default=None, help="share of units on SWA (or give --kv-budget)")
    p.add_argument("--kv-budget", type=open_fraction, default=None, metavar="B",
                   help="instead of --sparsity: KV at --budget-context tokens <= B of full attention's (sinks included)")
    p.add_argument("--budget-context", type=positive_int, default=None,
                   help="context for --kv-budget (required with it: rules read no training length)")
    p.add_argument("--window", type=positive_int, required=True)
    p.add_argument("--granularity", default="kv_head")
    p.add_argument("--sinks", type=nonneg_int, default=0)
    p.add_argument("--rule", action="append", help="rule name (repeatable; default: all)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds for the random rule")
    p.add_argument("--reopen-native", action="store_true",
                   help="also place the layers the model already slides (default: they stay as trained, uncounted)")
    p.add_argument("--out", required=True, help="directory for <rule>.json files")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..allocation import Allocation, ModelShape, check_granularity, swa_count
    from ..errors import ConsaError
    from ..files import output_dir
    from ..rules import RULES, rule_allocation
    from .common import check_model_dir

    model_dir = check_model_dir(args.model)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).get_text_config()
    except (OSError, ValueError, KeyError) as e:  # e.g. an unknown model_type
        raise ConsaError(f"cannot read the model config in {model_dir}: {(str(e) or type(e).__name__).splitlines()[0]}") from None
    shape = ModelShape(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                       cfg.num_attention_heads)
    check_granularity(args.granularity)
    if args.window < 1:
        raise ConsaError(f"window must be >= 1, got {args.window}")
    if (args.sparsity is None) == (args.kv_budget is None):
        raise ConsaError("--sparsity or --kv-budget is required: give exactly one")
    if args.kv_budget is not None and args.budget_context is None:
        raise ConsaError("--kv-budget needs --budget-context (the context at which the KV is counted)")
    native = _native(model_dir, args.reopen_native)
    n_units = len(Allocation.free_units(native, args.granularity, shape.num_kv_heads))
    if args.kv_budget is None:
        k = swa_count(args.sparsity, n_units)
    else:
        from ..budget import problem, swa_units_for_budget

        k = swa_units_for_budget(problem(shape, args.granularity, (args.window, None), args.kv_budget,
                                         args.budget_context, args.sinks, native))
        if k >= n_units:
            raise ConsaError(f"a KV budget of {args.kv_budget:g} leaves no unit on full attention at window {args.window}")
    names = args.rule or list(RULES)
    allocs = []
    for name in names:
        seeds = range(args.seeds) if name == "random" else [0]
        for s in seeds:
            allocs.append(rule_allocation(name, shape, args.granularity, k, args.window, args.sinks, seed=s, native=native))
    out = Path(args.out)
    with output_dir(out) as staged:
        for a in allocs:
            a.save(staged / f"{a.meta['method']}.json")
    for a in allocs:
        print(f"{a.meta['method']:>12}: FA share per layer {[round(x, 2) for x in a.fa_share_per_layer()]}")
    print(f"wrote {len(allocs)} allocations ({k} SWA units each) to {out}")
    return 0


def _native(model_dir, reopen: bool) -> list:
    """The model's own sliding windows per layer (None = full attention), read from a weightless copy of
    the model built on the meta device: the same rule the search applies (``models.searchable_native``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import searchable_native

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return searchable_native(skeleton, reopen)
