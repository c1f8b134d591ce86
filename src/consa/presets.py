"""Qwen3-architecture presets for the base models consa trains itself (no pretrained weights here).

Every preset is a full-attention Qwen3 with grouped-query attention. ``context`` is the training
sequence length and ``window`` (= context / 16: long range then spans 16 windows) the sliding window that searches and
rules use on that model. Parameter counts below are for a 16K vocabulary (tied embeddings).

============  ======  ======  =========  ========  =======  ======  =====================
name          layers  hidden  q/kv heads  head_dim  context  window  parameters (16K vocab)
============  ======  ======  =========  ========  =======  ======  =====================
tiny               4     128      4 / 2        32      256      16  ~2.8M (CPU, seconds)
small-gpu         16     384      8 / 4        64     4096     256  ~35M
base-gpu          24     512      8 / 4        64     4096     256  ~84M
paper-layout      28     256     16 / 8        32     2048     128  ~32M (Qwen3-0.6B's 28 × 8 KV heads)
============  ======  ======  =========  ========  =======  ======  =====================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConsaError


@dataclass(frozen=True)
class Preset:
    """Architecture and training defaults of one base model size."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context: int  # training sequence length (tokens)
    batch_size: int  # sequences per optimizer step
    lr: float  # peak AdamW learning rate
    tokens: int  # default token budget of `consa pretrain`
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    description: str = ""

    @property
    def window(self) -> int:
        """Default sliding window W = context / 16."""
        return max(1, self.context // 16)

    def to_dict(self) -> dict:
        return {**asdict(self), "window": self.window}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384,
               context=256, batch_size=16, lr=3e-3, tokens=2_000_000, rope_theta=10_000.0,
               description="CPU-sized: tests and the CPU demo"),
        Preset("small-gpu", num_layers=16, hidden_size=384, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1024,
               context=4096, batch_size=16, lr=1.5e-3, tokens=60_000_000,
               description="one H200 in a few minutes (the prototype size)"),
        Preset("base-gpu", num_layers=24, hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536,
               context=4096, batch_size=16, lr=1e-3, tokens=100_000_000,
               description="the reference experiment's base model (16+ layers, GQA, context >= 4096)"),
        Preset("paper-layout", num_layers=28, hidden_size=256, num_heads=16, num_kv_heads=8, head_dim=32,
               intermediate_size=768, context=2048, batch_size=16, lr=1.5e-3, tokens=60_000_000,
               description="the paper's unit layout (Qwen3-0.6B: 28 layers x 8 KV heads = 224 units), narrower and "
                           "at 2048 tokens so that a base trains in one 10-minute H200 call like small-gpu"),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`ConsaError` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConsaError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_context(name: str) -> int:
    """Training context (sequence length) of preset ``name``."""
    return get_preset(name).context


def preset_window(name: str) -> int:
    """Default sliding window of preset ``name`` (context / 16)."""
    return get_preset(name).window


def preset_config(name: str, vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, max_position_embeddings: int | None = None):
    """A full-attention ``Qwen3Config`` of preset ``name`` for a tokenizer of ``vocab_size`` ids."""
    from transformers import Qwen3Config

    p = get_preset(name)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ConsaError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        max_position_embeddings=max_position_embeddings or p.context,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta},
        tie_word_embeddings=p.tie_word_embeddings,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=p.num_layers,
        layer_types=["full_attention"] * p.num_layers,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
