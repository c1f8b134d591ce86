"""Composable mask functions, one small generator per pattern (attention-gym style).

Each ``*_mask_mod`` returns ``mask_mod(b, h, q_idx, kv_idx) -> bool`` usable by FlexAttention's
``create_block_mask`` and by :func:`dense_mask` (which evaluates it on index grids for SDPA and tests).

Indices are *cache slots* (the position of a token in the key/value sequence), the convention
transformers uses for its own sliding window: query slot i sees i−W+1 … i, plus the first S slots
when sinks are on. Training, eval and serving all go through these functions, so the SWA semantics
cannot drift between them.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask_mod() -> MaskMod:
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal


def sliding_window_mask_mod(window: int, sinks: int = 0) -> MaskMod:
    """Causal attention over the last ``window`` keys (self included), plus ``sinks`` leading slots."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def sliding(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        near = q_idx - kv_idx < window
        if sinks > 0:
            near = near | (kv_idx < sinks)
        return causal & near

    return sliding


def hybrid_mask_mod(fa_heads: torch.Tensor, window: int, sinks: int = 0) -> MaskMod:
    """Per query head: causal where ``fa_heads[h]`` (a bool tensor over query heads), else the sliding window."""
    sliding = sliding_window_mask_mod(window, sinks)

    def hybrid(b, h, q_idx, kv_idx):
        return sliding(b, h, q_idx, kv_idx) | (fa_heads[h] & (q_idx >= kv_idx))

    return hybrid


def offset_mask_mod(mask_mod: MaskMod, q_offset: int, kv_offset: int = 0) -> MaskMod:
    """Shift local indices to cache slots (for decode / chunked prefill where q starts at ``q_offset``)."""

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx + kv_offset)

    return shifted


def window_band(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Boolean [Tq, Tk] sliding-window visibility for explicit query/key slot indices."""
    return sliding_window_mask_mod(window, sinks)(None, None, q_pos[:, None], k_pos[None, :])


def causal_band(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return q_pos[:, None] >= k_pos[None, :]


def dense_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluate a mask_mod on the full [q_len, kv_len] grid (reference and small-size path)."""
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return mask_mod(None, None, q, k)


def main() -> None:  # pragma: no cover - a picture for humans
    import matplotlib.pyplot as plt

    m = dense_mask(sliding_window_mask_mod(4, sinks=1), 12, 12)
    plt.imshow(m.numpy(), cmap="Blues")
    plt.title("sliding window W=4, 1 sink")
    plt.xlabel("key slot")
    plt.ylabel("query slot")
    plt.savefig("sliding_window_mask.png", dpi=120)
    print("wrote sliding_window_mask.png")


if __name__ == "__main__":  # pragma: no cover
    main()
