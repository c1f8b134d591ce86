"""consa.compat: the cache and dtype keywords follow the installed transformers (``cache=`` on 5.2x,
``past_key_values=`` on 5.17, where a forward would swallow ``cache=`` and silently run without it),
and pyproject's filterwarnings rule turns an old-keyword call into a test failure."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from consa import compat
from consa.tiny import tiny_model


class _Old(nn.Module):  # transformers 5.17's forward
    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs): ...


class _New(nn.Module):  # transformers 5.2x's forward
    def forward(self, input_ids, cache=None, use_cache=None, **kwargs): ...


class _Wrapper(nn.Module):  # e.g. a PEFT wrapper: forwards everything through **kwargs
    def forward(self, *args, **kwargs): ...


def test_keyword_detection_covers_both_versions():
    assert compat.cache_kwarg_for(["self", "input_ids", "past_key_values", "kwargs"]) == "past_key_values"
    assert compat.cache_kwarg_for(["self", "input_ids", "cache", "kwargs"]) == "cache"
    assert compat.cache_kwargs(1, _Old()) == {"past_key_values": 1}
    assert compat.cache_kwargs(1, _New()) == {"cache": 1}
    assert compat.cache_kwargs(1, _Wrapper()) == {compat.CACHE_KWARG: 1} == compat.cache_kwargs(1)
    with pytest.raises(AttributeError):
        compat.NO_SUCH_NAME  # noqa: B018

    # a forward behind transformers' own renaming decorator shows the new name (inspect follows __wrapped__)
    from transformers.utils.deprecation import deprecate_kwarg

    class Decorated(nn.Module):
        @deprecate_kwarg("past_key_values", "99.0.0", new_name="cache")
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert compat.cache_kwarg(Decorated()) == "cache"


def test_installed_keyword_is_what_the_model_forwards_take():
    from transformers import Qwen3ForCausalLM

    assert compat.CACHE_KWARG in inspect.signature(Qwen3ForCausalLM.forward).parameters
    assert compat.cache_kwarg(tiny_model("qwen3")) == compat.CACHE_KWARG


def test_output_cache_reads_either_field():
    assert compat.output_cache(SimpleNamespace(past_key_values="old")) == "old"
    assert compat.output_cache(SimpleNamespace(cache="new", past_key_values=None)) == "new"
    assert compat.output_cache({"cache": "new"}) == "new" and compat.output_cache(SimpleNamespace()) is None


@torch.no_grad()
def test_cache_passed_the_compat_way_is_used():
    """Prefill 7 tokens, then 4 more through the returned cache: the logits equal one full forward.
    With a keyword the forward does not take, the second call would see 4 tokens without context."""
    from transformers import DynamicCache

    model = tiny_model("qwen3", num_layers=2).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids).logits
    out = model(input_ids=ids[:, :7], **compat.cache_kwargs(DynamicCache(config=model.config), model), use_cache=True)
    cache = compat.output_cache(out)
    assert cache is not None and cache.get_seq_length() == 7
    step = model(input_ids=ids[:, 7:], **compat.cache_kwargs(cache, model), use_cache=True).logits
    tol = 64 * torch.finfo(full.dtype).eps * float(full.abs().max())
    torch.testing.assert_close(step, full[:, 7:], atol=tol, rtol=0)

    mine = DynamicCache(config=model.config)
    gen = model.generate(ids, **compat.cache_kwargs(mine, model), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 14) and mine.get_seq_length() == 13  # generate filled the cache it was given


@torch.no_grad()
def test_old_cache_keyword_fails_under_the_pytest_rule():
    """pyproject's filterwarnings makes transformers' FutureWarning for `past_key_values` an error
    in every test; the compat call in the test above ran under the same rule."""
    if compat.CACHE_KWARG == "past_key_values":
        pytest.skip("this transformers still takes past_key_values (5.17): nothing is deprecated")
    from transformers import DynamicCache

    model = tiny_model("qwen3", num_layers=1).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=1, pad_token_id=0)


def test_dtype_keyword_loads_without_the_torch_dtype_notice(tmp_path):
    """transformers reports ``torch_dtype=`` through its logger (``warning_once``), not the warnings
    module, so the pytest rule cannot see it: watch the logger instead, for consa's loader and the old call."""
    import transformers
    from transformers import AutoModelForCausalLM

    from consa.models import load_model

    tiny_model("qwen3", num_layers=1).save_pretrained(tmp_path)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # consa's CLI (run by other tests) sets transformers to errors only
    try:
        transformers.utils.logging.warning_once.cache_clear()  # each notice is logged once per process
        model = load_model(tmp_path, dtype=torch.float64)
        assert next(model.parameters()).dtype == torch.float64
        assert not [m for m in records if "torch_dtype" in m], records
        # the probe can see the notice: the old keyword logs it
        AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True, torch_dtype=torch.float64)
        assert [m for m in records if "torch_dtype" in m]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
