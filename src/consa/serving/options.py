"""What one generate call asks of the static path, and the eager choice of each next token.

``model.generate`` merges the model's generation defaults with the call's keywords into a
GenerationConfig and builds its logits processors and stopping criteria from it. The static path
builds them with the same GenerationMixin helpers (``_prepare_generation_config``,
``_prepare_special_tokens``, ``_prepare_attention_mask_for_generation``, ``_prepare_generated_length``,
``_get_logits_processor``, ``_get_stopping_criteria``: one signature each from transformers 5.17 to
5.25), so ``min_new_tokens``, ``repetition_penalty``, ``stop_strings``, end-token lists, the sampling
warpers and a caller's own processors act exactly as they do in ``model.generate`` (on 5.25 a
repetition penalty ignores left padding, on 5.17 it does not: the helpers carry such differences).
Rebuilding them from the public classes would drift from ``generate`` whenever transformers changes
one. A version whose helpers no longer fit sends every call to the eager path with one log line.

The processors run eagerly on the [B, vocab] logits a (captured) decode step returns: a few small
ops beside a whole model step. :func:`next_tokens` is that choice (logits in, next tokens out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("consa")

# generate()'s own parameters that the static path serves; anything else that is not a
# GenerationConfig field (assistant_model, negative_prompt_ids, inputs_embeds, …) needs model.generate
CALL_ARGS = ("generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "streamer",
             "tokenizer", "synced_gpus")
MODEL_KWARGS = ("attention_mask",)  # forward inputs the static path takes

# GenerationConfig fields that need transformers' own loop, each with a test of its value
EAGER_FIELDS = {
    "num_return_sequences": lambda v: v not in (None, 1),
    "output_scores": bool, "output_logits": bool, "return_dict_in_generate": bool,
    "output_attentions": bool, "output_hidden_states": bool,
    "guidance_scale": lambda v: v not in (None, 1),  # its processor runs the model a second time
    "use_cache": lambda v: v is False,
    "cache_implementation": lambda v: v is not None,
    "prefill_chunk_size": lambda v: v is not None,
    "token_healing": bool,
}
# decoding modes other than greedy and sampling, by the option that picks them
MODE_OPTIONS = {"beam_search": "num_beams", "beam_sample": "num_beams", "group_beam_search": "num_beam_groups",
                "constrained_beam_search": "constraints", "contrastive_search": "penalty_alpha",
                "dola_generation": "dola_layers", "assisted_generation": "assistant_model / prompt_lookup_num_tokens"}

_logged: set[str] = set()


class EagerOnly(ValueError):
    """This call needs ``model.generate``'s own loop; ``option`` names what asked for it."""

    def __init__(self, option: str):
        super().__init__(f"{option} needs transformers' own generate loop")
        self.option = option


def log_eager(option: str, verb: str = "needs") -> None:
    """One log line per option (or model) per process: the call runs on the (slower) eager path, and why."""
    if option not in _logged:
        _logged.add(option)
        log.warning("consa.generate: %s %s the eager path (model.generate with a HybridCache, several times "
                    "slower than the static engine); later calls with it take it without this message", option, verb)


@dataclass
class GenerationPlan:
    """One call, resolved: how many new tokens, which end tokens, which pad, and the processors and
    stopping criteria transformers would apply (the max-length and end-token criteria are the
    engine's own: ``max_new_tokens``, ``eos``)."""

    config: object  # the merged GenerationConfig (special tokens prepared)
    max_new_tokens: int
    eos: list[int]
    pad: int
    pad_finished: bool  # finished rows emit ``pad`` (transformers: when an end-token criterion exists)
    processors: list = field(default_factory=list)  # a LogitsProcessorList
    stops: list = field(default_factory=list)  # other stopping criteria (stop strings, max time, the caller's)
    do_sample: bool = False
    streamer: object = None
    attention_mask: torch.Tensor | None = None

    @property
    def greedy(self) -> bool:
        """Plain argmax with end tokens only: the whole step, choice included, can be one captured graph."""
        return not (self.do_sample or len(self.processors) or self.stops or self.streamer is not None)


def next_tokens(processors, input_ids: torch.Tensor, logits: torch.Tensor, do_sample: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row as ``model.generate`` chooses it: the processors on a float32 copy
    of the logits [B, V] given the sequences so far [B, T] (prompt and new tokens), then argmax or a
    draw from the softmax. Returns [B] int64."""
    scores = logits.to(dtype=torch.float32, copy=True)
    if processors:
        scores = processors(input_ids, scores)
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
    return torch.argmax(scores, dim=-1)


def _split(kwargs: dict) -> tuple[dict, dict]:
    call = {k: kwargs[k] for k in CALL_ARGS if kwargs.get(k) is not None}
    rest = {k: v for k, v in kwargs.items() if k not in CALL_ARGS}
    return call, rest


def _config(model, kwargs: dict):
    """(call args, merged GenerationConfig, model kwargs), or EagerOnly naming the first option the
    static path does not serve."""
    call, rest = _split(kwargs)
    if call.get("synced_gpus"):
        raise EagerOnly("synced_gpus")
    try:
        gc, model_kwargs = model._prepare_generation_config(call.get("generation_config"), **rest)
    except (AttributeError, TypeError) as e:  # a transformers whose helpers changed
        raise EagerOnly(f"this transformers version ({type(e).__name__} in its generate helpers)") from e
    mode = gc.get_generation_mode(rest.get("assistant_model")).value
    if mode not in ("greedy_search", "sample"):
        raise EagerOnly(MODE_OPTIONS.get(mode, mode))
    for name, needs in EAGER_FIELDS.items():
        if needs(getattr(gc, name, None)):
            raise EagerOnly(f"{name}={getattr(gc, name)!r}")
    extra = sorted(k for k, v in model_kwargs.items() if k not in MODEL_KWARGS and v is not None)
    if extra:
        raise EagerOnly(", ".join(extra))
    return call, gc, model_kwargs


def eager_reason(model, kwargs: dict) -> str | None:
    """None when the static path serves a call with these keywords, else the option that needs the
    eager path (the call's input is not needed to tell)."""
    try:
        _config(model, kwargs)
    except EagerOnly as e:
        return e.option
    return None


def _ids(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(x) for x in t.reshape(-1).tolist()]


def plan(model, input_ids: torch.Tensor, kwargs: dict) -> GenerationPlan:
    """Resolve a call as ``model.generate(input_ids, **kwargs)`` would (raises :class:`EagerOnly`)."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    call, gc, model_kwargs = _config(model, kwargs)
    b, t = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    user_max = kwargs.get("max_length") is not None or (call.get("generation_config") is not None
                                                         and call["generation_config"].max_length is not None)
    has_default_max = not user_max and model.generation_config.max_length is None
    has_default_min = (kwargs.get("min_length") is None and model.generation_config.min_length is None
                       and (call.get("generation_config") is None or call["generation_config"].min_length is None))
    try:
        model._prepare_special_tokens(gc, mask is not None, device=input_ids.device, batch_size=b)
        if mask is None:
            mask = model._prepare_attention_mask_for_generation(input_ids, gc, {})
        gc = model._prepare_generated_length(generation_config=gc, has_default_max_length=has_default_max,
                                             has_default_min_length=has_default_min, model_input_name="input_ids",
                                             inputs_tensor=input_ids, input_ids_length=t)
        processors = model._get_logits_processor(
            generation_config=gc, input_ids_seq_length=t, encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=call.get("prefix_allowed_tokens_fn"), logits_processor=call.get("logits_processor"),
            device=input_ids.device, model_kwargs={"attention_mask": mask})
        criteria = model._get_stopping_criteria(generation_config=gc, stopping_criteria=call.get("stopping_criteria") or StoppingCriteriaList(),
                                                tokenizer=call.get("tokenizer"))
    except (AttributeError, TypeError) as e:
        raise EagerOnly(f"this transformers version ({type(e).__name__} in its generate helpers)") from e
    max_len = min((c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)), default=gc.max_length)
    eos = sorted({e for c in criteria if isinstance(c, EosTokenCriteria) for e in _ids(c.eos_token_id)})
    stops = [c for c in criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    pad = gc._pad_token_tensor
    return GenerationPlan(
        config=gc, max_new_tokens=max(0, int(max_len) - t), eos=eos, pad=int(pad) if pad is not None else 0,
        pad_finished=any(hasattr(c, "eos_token_id") for c in criteria), processors=processors, stops=stops,
        do_sample=bool(gc.do_sample), streamer=call.get("streamer"), attention_mask=mask,
    )
