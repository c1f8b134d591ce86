"""generate's everyday options on the static path (consa.serving.options): the same tokens as
``model.generate`` with the same options on an all-FA allocation (against plain transformers) and as
the eager HybridCache path on a hybrid one; one log line for an option that still needs the eager
path; one engine per model kept between calls; the compiled decode step's tokens."""

from __future__ import annotations

import logging
import shutil
import string

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import consa
from consa.allocation import Allocation
from consa.serving import generate as serving
from consa.serving import options
from consa.serving.generate import generate, generate_static
from consa.tiny import tiny_model

MIXED = [[True, False], [False, True], [False, False]]


def _model(rows="mixed", window=4, sinks=1, seed=0):
    model = tiny_model("qwen3", seed=seed, num_kv_heads=2, num_layers=3)
    rows = {"mixed": MIXED, "fa": [[True, True]] * 3}[rows]
    consa.apply_allocation(model, Allocation("kv_head", consa.model_shape(model), window, tuple(map(tuple, rows)), sinks))
    return model


def _batch(seed=2):
    """Three prompts of 11, 8 and 5 tokens, left-padded (the padding longer than the window on row 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask


def _tokenizer():
    """A character-level tokenizer over the tiny model's 101 ids (stop strings need one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = (string.ascii_letters + string.digits + string.punctuation + "àáâãäåæ")[:101]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


class StopAfter(StoppingCriteria):
    """A row ends once it holds ``token`` among its new tokens (a caller's own criterion)."""

    def __init__(self, token, prompt_len):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_len:] == self.token).any(-1)


class Collect(BaseStreamer):
    def __init__(self):
        self.got, self.ended = [], False

    def put(self, value):
        self.got.append(value.tolist())

    def end(self):
        self.ended = True


BASE = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None)


def _free_run(model, ids, mask):
    return generate(model, ids, static=False, attention_mask=mask, do_sample=False, **BASE)


def _cases(model, ids, mask):
    """name -> (generate options, a check that the option changed the output)."""
    t = ids.shape[1]
    free = _free_run(model, ids, mask)
    early = int(free[0, t + 1])  # row 0's second new token: an end token that stops it early
    late = int(free[1, t + 4])
    texts = [_tokenizer().decode(free[r, t + 2 : t + 4].tolist()) for r in range(3)]  # two new tokens of each row
    return {
        "greedy_min_new_tokens": (dict(BASE, eos_token_id=early, min_new_tokens=6), lambda out: out.shape[1] >= t + 6),
        "eos_list": (dict(BASE, eos_token_id=[early, late]), lambda out: (out[0, t + 2 :] == 0).all()),
        "repetition_penalty": (dict(BASE, repetition_penalty=1.8), None),
        "no_repeat_ngram": (dict(BASE, no_repeat_ngram_size=2), None),
        "bad_words": (dict(BASE, bad_words_ids=[[early]]), lambda out: not (out[:, t:] == early).any()),
        "suppress_tokens": (dict(BASE, suppress_tokens=[early, late]), lambda out: not (out[:, t:] == early).any()),
        "stop_strings": (dict(BASE, stop_strings=texts, tokenizer=_tokenizer()), lambda out: out.shape[1] < free.shape[1]),
        "own_processor_and_criterion": (dict(BASE, logits_processor=LogitsProcessorList([BanToken(late)]),
                                             stopping_criteria=StoppingCriteriaList([StopAfter(early, t)])), None),
        "default_length": ({"pad_token_id": 0, "eos_token_id": None}, lambda out: out.shape[1] == t + 20),
        "sample": (dict(BASE, do_sample=True, temperature=0.8, top_k=20, top_p=0.9), None),
        "sample_penalty_min_p": (dict(BASE, do_sample=True, repetition_penalty=1.3, min_p=0.05, eos_token_id=early,
                                      min_new_tokens=3), None),
    }


CASES = ["greedy_min_new_tokens", "eos_list", "repetition_penalty", "no_repeat_ngram", "bad_words", "suppress_tokens",
         "stop_strings", "own_processor_and_criterion", "default_length", "sample", "sample_penalty_min_p"]


@pytest.mark.parametrize("case", CASES)
def test_all_fa_static_equals_plain_transformers(case, one_thread):
    """Full attention through the static engine (cuda_graphs=False, the CPU twin of the captured
    steps) against transformers' own generate on the same weights without consa."""
    model, plain = _model("fa"), tiny_model("qwen3", seed=0, num_kv_heads=2, num_layers=3)
    ids, mask = _batch()
    kw, changed = _cases(plain, ids, mask)[case]
    assert options.plan(model, ids, dict(kw, attention_mask=mask)).greedy is (case in ("eos_list", "default_length"))
    torch.manual_seed(7)
    want = plain.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    got = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **kw)
    assert torch.equal(got, want), (got, want)
    if changed is not None:
        assert changed(want)


@pytest.mark.parametrize("case", CASES)
def test_hybrid_static_equals_eager_hybrid_cache(case, one_thread):
    model = _model("mixed")
    ids, mask = _batch()
    kw, changed = _cases(model, ids, mask)[case]
    torch.manual_seed(7)
    want = generate(model, ids, static=False, attention_mask=mask, **kw)
    torch.manual_seed(7)
    got = generate(model, ids, static=True, cuda_graphs=False, attention_mask=mask, **kw)
    assert torch.equal(got, want), (got, want)
    if changed is not None:
        assert changed(want)


def test_streamer_sees_what_transformers_streams(one_thread):
    model, plain = _model("fa"), tiny_model("qwen3", seed=0, num_kv_heads=2, num_layers=3)
    ids = _batch()[0][:1]
    kw = dict(BASE, eos_token_id=int(_free_run(plain, ids, torch.ones_like(ids))[0, 13]))
    want, got = Collect(), Collect()
    plain.generate(ids, streamer=want, **kw)
    generate_static(model, ids, cuda_graphs=False, streamer=got, **kw)
    assert got.ended and want.ended and got.got == want.got and len(got.got) > 2


def test_next_tokens_is_generates_choice():
    """The public choice: processors on a float32 copy of the logits, then argmax (logits untouched)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 11, dtype=torch.bfloat16)
    seq = torch.tensor([[3, 4], [5, 5]])
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)])
    want = procs(seq, logits.float().clone()).argmax(-1)
    before = logits.clone()
    assert torch.equal(options.next_tokens(procs, seq, logits, do_sample=False), want)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("kw,option", [(dict(num_beams=2), "num_beams"), (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
                                       (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"), (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
                                       (dict(inputs_embeds=torch.zeros(1)), "inputs_embeds")])
def test_eager_only_options_log_one_line_naming_them(kw, option, caplog, monkeypatch):
    model = _model()
    ids, mask = _batch()
    monkeypatch.setattr(options, "_logged", set())
    assert option in serving.static_supported(model, kw)
    with pytest.raises(ValueError, match=option):
        generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **kw)
    with caplog.at_level(logging.WARNING, logger="consa"):
        for _ in range(3):
            assert serving.static_by_default(model, kw, on_cuda=True) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "consa"]
    assert len(lines) == 1 and option in lines[0] and "eager" in lines[0]


def test_a_model_the_engine_cannot_hold_is_logged_once_on_cuda(caplog, monkeypatch):
    """A decoder with linear-attention layers (Qwen3.5) cannot live in the static cache: on CUDA
    ``consa.generate`` takes the eager path and says so once, naming why; on CPU (always eager) nothing."""
    from consa.families import tiny_model as family_model

    model = family_model("qwen3_5_text")
    shape = consa.model_shape(model)
    consa.apply_allocation(model, Allocation("kv_head", shape, 4, tuple((True,) * shape.num_kv_heads for _ in range(shape.num_layers)), 0))
    monkeypatch.setattr(options, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="consa"):
        assert serving.static_by_default(model, {}, on_cuda=False) is False
        assert not [r for r in caplog.records if r.name == "consa"]
        for _ in range(3):
            assert serving.static_by_default(model, {}, on_cuda=True) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "consa"]
    assert len(lines) == 1 and "mixes attention with other layers" in lines[0] and "eager path" in lines[0]


def test_everyday_options_keep_the_static_path(caplog):
    model = _model()
    with caplog.at_level(logging.WARNING, logger="consa"):
        for kw in (dict(min_new_tokens=4), dict(repetition_penalty=1.2), dict(eos_token_id=[1, 2]), dict(do_sample=True, top_p=0.5),
                   dict(stop_strings=["ab"], tokenizer=None), dict(no_repeat_ngram_size=3), dict(max_length=30)):
            assert serving.static_by_default(model, kw, on_cuda=True) is True, kw
            assert serving.static_by_default(model, kw, on_cuda=False) is False
    assert not [r for r in caplog.records if r.name == "consa"]


def test_one_engine_per_model_kept_between_calls(monkeypatch, one_thread):
    """A second call (other prompt length in the same bucket, other options) builds nothing; another
    batch size, a new allocation or release() does."""
    built = []

    class Counting(serving.DecodeEngine):
        def __init__(self, *a, **k):
            built.append(a[1:3])
            super().__init__(*a, **k)

    monkeypatch.setattr(serving, "DecodeEngine", Counting)
    serving.release()
    model = _model()
    ids, mask = _batch()
    first = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **BASE)
    again = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **BASE)
    generate_static(model, ids[:, 2:], cuda_graphs=False, attention_mask=mask[:, 2:], **dict(BASE, repetition_penalty=1.3))
    generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **dict(BASE, do_sample=True))
    assert torch.equal(first, again) and built == [(3, serving.bucket(11 + 12))]
    generate_static(model, ids[:2], cuda_graphs=False, attention_mask=mask[:2], **BASE)
    assert len(built) == 2
    consa.apply_allocation(model, Allocation("kv_head", consa.model_shape(model), 4, tuple(map(tuple, MIXED)), 1))
    generate_static(model, ids[:2], cuda_graphs=False, attention_mask=mask[:2], **BASE)
    assert len(built) == 3
    serving.release(model)
    generate_static(model, ids[:2], cuda_graphs=False, attention_mask=mask[:2], **BASE)
    assert len(built) == 4
    serving.release()


def test_bucket_rounds_up_a_little():
    for n in (1, 63, 64, 65, 1000, 4097, 32832, 131136):
        b = serving.bucket(n)
        assert n <= b < n + max(64, n / 8), (n, b)
    assert serving.bucket(32768 + 64) == serving.bucket(32768 + 100)


def _inductor_cpu() -> str | None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "inductor on CPU needs a C++ compiler"
    return None


@pytest.mark.skipif(_inductor_cpu() is not None, reason=_inductor_cpu() or "")
def test_compiled_decode_step_gives_the_same_tokens(one_thread):
    """The engine's compiled forward (inductor on CPU here; CUDA graphs on the GPU) keeps greedy and
    processed tokens, and compiles once for every step of a call and of the next call."""
    from torch._dynamo.utils import counters

    model = _model("mixed")
    ids, mask = _batch()
    kw = dict(BASE, max_new_tokens=6)
    want = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **kw)
    penal = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **dict(kw, repetition_penalty=1.5))
    torch._dynamo.reset()
    counters.clear()
    got = generate_static(model, ids, cuda_graphs=False, compile=True, attention_mask=mask, **kw)
    got_penal = generate_static(model, ids, cuda_graphs=False, compile=True, attention_mask=mask, **dict(kw, repetition_penalty=1.5))
    assert torch.equal(got, want) and torch.equal(got_penal, penal)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompile, no graph break
    serving.release()


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_model(rows="mixed"):
    model = tiny_model("qwen3", seed=0, num_kv_heads=2, num_layers=3, hidden_size=128, num_heads=4, head_dim=32).cuda()
    rows = {"mixed": MIXED, "fa": [[True, True]] * 3}[rows]
    consa.apply_allocation(model, Allocation("kv_head", consa.model_shape(model), 4, tuple(map(tuple, rows)), 1))
    return model


@pytest.mark.parametrize("case", ["greedy_min_new_tokens", "eos_list", "repetition_penalty", "stop_strings", "sample"])
def test_captured_steps_with_options_equal_eager_steps(case):
    """On CUDA the forward is a graph replay and the options run after it: the same tokens as the same
    steps run eagerly, and the second call replays the graphs the first one captured."""
    model = _cuda_model()
    ids, mask = (x.cuda() for x in _batch())
    kw, _ = _cases(model, ids, mask)[case]
    serving.release()
    torch.manual_seed(7)
    want = generate_static(model, ids, cuda_graphs=False, attention_mask=mask, **kw)
    serving.release()
    torch.manual_seed(7)
    got = generate_static(model, ids, attention_mask=mask, **kw)
    engine = serving.engine_for(model, 3, 11 + 12)
    graphs, spent = dict(engine._graphs), engine.capture_s
    torch.manual_seed(7)
    again = generate_static(model, ids, attention_mask=mask, **kw)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert engine.graphs and graphs and engine._graphs == graphs and engine.capture_s == spent
    serving.release()


@pytest.mark.parametrize("rows", ["mixed", "fa"])
def test_compiled_captured_decode_equals_eager(rows):
    """torch.compile inside the captured step (custom ops for the cache write and the Triton decode
    kernel): the eager tokens, one compiled graph (no graph break, no recompile per step)."""
    from torch._dynamo.utils import counters

    model = _cuda_model(rows)
    ids, mask = (x.cuda() for x in _batch())
    kw = dict(BASE, max_new_tokens=10)
    serving.release()
    want = generate_static(model, ids, cuda_graphs=True, attention_mask=mask, **kw)
    penal = generate_static(model, ids, cuda_graphs=True, attention_mask=mask, **dict(kw, repetition_penalty=1.4))
    torch._dynamo.reset()
    counters.clear()
    got = generate_static(model, ids, compile=True, attention_mask=mask, **kw)
    got_penal = generate_static(model, ids, compile=True, attention_mask=mask, **dict(kw, repetition_penalty=1.4))
    assert torch.equal(got, want) and torch.equal(got_penal, penal)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    serving.release()


for _name in ("test_captured_steps_with_options_equal_eager_steps", "test_compiled_captured_decode_equals_eager"):
    for _mark in GPU:
        globals()[_name] = _mark(globals()[_name])
