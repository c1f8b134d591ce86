"""Attention logit soft-capping and learned sink logits: the maths every attention path shares.

Two changes to softmax attention that some decoders make, both kept exact in every consa kernel:

* **soft-capping** (Gemma2, ``softcap=``): each score s = q·k·scale becomes cap·tanh(s / cap) before
  the mask, so no logit leaves (−cap, cap);
* **learned sink logits** (gpt-oss, ``s_aux=``): one logit per query head joins the softmax denominator
  and carries no value. With ``out`` and ``lse`` the attention over the real keys and its natural
  log-sum-exp, the sink gives out · e^lse / (e^lse + e^s) = out · σ(lse − s) exactly; so any kernel
  that returns its log-sum-exp serves sinks with one fold (:func:`fold_sink_logits`), and an
  online-softmax kernel simply starts its running max at s and its running sum at 1.

:func:`dense_attention` is the explicit math path: calls that no kernel able to take these features
can run (SDPA takes neither) go to it; the float64 reference (``kernels.reference_attention``) is
written apart from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

MAX_SCORE_ELEMENTS = 1 << 26  # dense_attention: query rows per chunk such that a chunk's scores stay this small


@dataclass(frozen=True, eq=False)
class LogitMods:
    """What a layer changes in its attention logits, as transformers hands it to the attention function
    (``softcap=``, ``s_aux=``): a soft cap, and one sink logit per query head (in the query heads' order
    of the call). Kernels take the two as ``softcap=`` / ``sink_logits=`` keywords (:meth:`kwargs`)."""

    softcap: float | None = None
    sink_logits: torch.Tensor | None = None  # [Hq]

    @classmethod
    def of(cls, softcap: float | None = None, sink_logits: torch.Tensor | None = None) -> "LogitMods | None":
        """The mods of a call, or None when it has neither (every kernel runs it unchanged)."""
        softcap = check_softcap(softcap)
        if softcap is None and sink_logits is None:
            return None
        if sink_logits is not None and sink_logits.dim() != 1:
            raise ValueError(f"sink logits must be one per query head, got shape {tuple(sink_logits.shape)}")
        return cls(softcap, sink_logits)

    def heads(self, sel) -> "LogitMods":
        """The mods of the query heads ``sel`` (a slice or an index tensor) names."""
        return LogitMods(self.softcap, head_sink_logits(self.sink_logits, sel))

    def kwargs(self) -> dict:
        return {"softcap": self.softcap, "sink_logits": self.sink_logits}


def mod_kwargs(mods: "LogitMods | None") -> dict:
    """Keywords for a kernel entry point: none at all without mods (so entries that take none work)."""
    return {} if mods is None else mods.kwargs()


def mods_of_heads(mods: "LogitMods | None", sel) -> "LogitMods | None":
    """The mods of the query heads ``sel`` names (None stays None)."""
    return None if mods is None else mods.heads(sel)


def check_softcap(softcap: float | None) -> float | None:
    """``softcap`` as a float, or None when off; a non-positive cap is an error (tanh(s / 0))."""
    if softcap is None:
        return None
    if not softcap > 0:
        raise ValueError(f"attention logit soft-capping needs a positive cap, got {softcap!r}")
    return float(softcap)


def cap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap · tanh(scores / cap) (``softcap`` None: the scores unchanged)."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def head_sink_logits(sink_logits: torch.Tensor | None, sel) -> torch.Tensor | None:
    """The sink logits of some query heads: ``sel`` a slice or an index tensor over query heads."""
    if sink_logits is None or sel is None:
        return sink_logits
    return sink_logits[sel] if isinstance(sel, slice) else sink_logits.index_select(0, sel.to(sink_logits.device))


def fold_sink_logits(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
    """Attention output with the per-head sink logit in its softmax: out [B, H, T, D] (any strides) and
    lse [B, H, T] (natural log, over the keys ``out`` attended) → out · σ(lse − sink[h]), in out's dtype.
    A row that saw no key (lse = −inf) stays 0."""
    if sink_logits is None:
        return out
    keep = torch.sigmoid(lse.float() - sink_logits.float().view(1, -1, 1))
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def attention_weights(scores: torch.Tensor, allowed: torch.Tensor | None, softcap: float | None = None,
                      sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax weights over the keys from raw scores (q·k·scale) [..., H, Tq, Tk]: soft-capped, masked
    by ``allowed`` (boolean, broadcastable; None = all), with the sink logit of each head (dim −3) as
    one more softmax column, dropped afterwards (so a row sums to less than 1). A row with nothing
    visible and no sink is 0."""
    scores = cap_scores(scores, softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sink_logits is None:
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    shape = [1] * scores.dim()
    shape[-3] = -1
    sink = sink_logits.to(scores.dtype).view(shape).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def dense_attention(q, k, v, allowed: torch.Tensor | None, scale: float, softcap: float | None = None,
                    sink_logits: torch.Tensor | None = None, dropout: float = 0.0, dtype: torch.dtype | None = None):
    """Softmax attention of q [B, Hq, Tq, D] over k, v [B, Hk, Tk, D] (GQA by repetition), computed
    explicitly: scores (soft-capped), then the boolean mask ``allowed`` (broadcastable to
    [B, Hq, Tq, Tk]; None = every key), then the sink logit column, softmax, its column dropped.
    In ``dtype`` (default float32, float64 for float64 inputs); returns q's dtype. Differentiable in
    every input, the sink logits included; queries run in chunks so the scores stay bounded.
    A row with no visible key returns 0."""
    work = dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    g = q.shape[1] // k.shape[1]
    kk = k.to(work).repeat_interleave(g, dim=1) if g > 1 else k.to(work)
    vv = v.to(work).repeat_interleave(g, dim=1) if g > 1 else v.to(work)
    tq, tk = q.shape[-2], k.shape[-2]
    rows = max(1, MAX_SCORE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * tk))
    outs = []
    for lo in range(0, tq, rows):
        hi = min(tq, lo + rows)
        s = torch.matmul(q[:, :, lo:hi].to(work), kk.transpose(-1, -2)) * scale
        a = allowed[..., lo:hi, :] if allowed is not None and allowed.shape[-2] == tq else allowed
        p = attention_weights(s, a, softcap, sink_logits)
        if dropout:
            p = F.dropout(p, p=dropout)
        outs.append(torch.matmul(p, vv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out.to(q.dtype)


@lru_cache(maxsize=16)
def flex_score_mod(softcap: float | None):
    """FlexAttention ``score_mod`` for the soft cap (None when off); one function object per cap, so
    a compiled FlexAttention is not traced again for every call."""
    if softcap is None:
        return None

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return capped
