"""The Allocation: which attention units keep full attention (FA) and which become sliding-window (SWA).

An allocation is the one artefact every stage of consa exchanges: search and rules produce it, the
attention function and the hybrid cache consume it, export stores it. It knows nothing of transformers.

Units are whole layers (``granularity="layer"``) or single KV heads (``"kv_head"``; a KV head's bit is
shared by the query heads of its GQA group). Internally the bits are always expanded per KV head
(``fa[layer][kv_head]``), so consumers never branch on granularity.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import ConsaError
from .files import atomic_write_text, read_json

FORMAT = "consa.allocation"
VERSION = 1
GRANULARITIES = ("layer", "kv_head")


class AllocationError(ConsaError, ValueError):
    """A malformed, inconsistent or mismatched allocation (one clear line)."""


@dataclass(frozen=True)
class ModelShape:
    """The attention shape an allocation is made for."""

    num_layers: int
    num_kv_heads: int
    num_q_heads: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "num_q_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AllocationError(f"{name} must be a positive integer, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise AllocationError(
                f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def num_units(self, granularity: str) -> int:
        check_granularity(granularity)
        return self.num_layers if granularity == "layer" else self.num_layers * self.num_kv_heads


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise AllocationError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return granularity


def swa_count(sparsity: float, num_units: int) -> int:
    """Exact number of SWA units for a sparsity target: round(t·N), t in (0, 1)."""
    check_sparsity(sparsity)
    return int(math.floor(sparsity * num_units + 0.5))


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not (0.0 < float(sparsity) < 1.0) or math.isnan(sparsity):
        raise AllocationError(f"sparsity must be strictly between 0 and 1, got {sparsity!r}")
    return float(sparsity)


@dataclass(frozen=True)
class Allocation:
    """Per-unit FA/SWA bits plus everything needed to apply them identically everywhere.

    ``fa`` holds one tuple per layer with one bool per KV head (True = full attention). For
    ``granularity="layer"`` every head of a layer carries the same bit.
    """

    granularity: str
    shape: ModelShape
    window: int
    fa: tuple[tuple[bool, ...], ...]
    sinks: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise AllocationError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise AllocationError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        fa = tuple(tuple(bool(b) for b in row) for row in self.fa)
        object.__setattr__(self, "fa", fa)
        if len(fa) != self.shape.num_layers:
            raise AllocationError(f"allocation has {len(fa)} layers, shape says {self.shape.num_layers}")
        for i, row in enumerate(fa):
            if len(row) != self.shape.num_kv_heads:
                raise AllocationError(
                    f"layer {i} has {len(row)} KV heads, shape says {self.shape.num_kv_heads}"
                )
            if self.granularity == "layer" and len(set(row)) > 1:
                raise AllocationError(f"layer-granularity allocation mixes FA and SWA heads in layer {i}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_units(
        cls,
        units_fa: Sequence[bool],
        granularity: str,
        shape: ModelShape,
        window: int,
        sinks: int = 0,
        meta: dict | None = None,
    ) -> "Allocation":
        """Build from a flat per-unit FA vector (layer-major for kv_head units)."""
        n = shape.num_units(granularity)
        units = [bool(u) for u in units_fa]
        if len(units) != n:
            raise AllocationError(f"expected {n} {granularity} units, got {len(units)}")
        if granularity == "layer":
            fa = [[u] * shape.num_kv_heads for u in units]
        else:
            h = shape.num_kv_heads
            fa = [units[i * h : (i + 1) * h] for i in range(shape.num_layers)]
        return cls(granularity, shape, window, tuple(map(tuple, fa)), sinks, dict(meta or {}))

    @classmethod
    def uniform(cls, fa: bool, granularity: str, shape: ModelShape, window: int, sinks: int = 0) -> "Allocation":
        return cls.from_units([fa] * shape.num_units(granularity), granularity, shape, window, sinks)

    # ---- views ----------------------------------------------------------------------------------
    @property
    def units(self) -> list[bool]:
        """Flat per-unit FA bits (layer-major)."""
        if self.granularity == "layer":
            return [row[0] for row in self.fa]
        return [b for row in self.fa for b in row]

    @property
    def num_units(self) -> int:
        return self.shape.num_units(self.granularity)

    @property
    def num_swa(self) -> int:
        return sum(not u for u in self.units)

    @property
    def sparsity(self) -> float:
        return self.num_swa / self.num_units

    def fa_heads(self, layer: int) -> list[int]:
        return [h for h, b in enumerate(self.fa[layer]) if b]

    def swa_heads(self, layer: int) -> list[int]:
        return [h for h, b in enumerate(self.fa[layer]) if not b]

    def with_window(self, window: int, sinks: int | None = None) -> "Allocation":
        return Allocation(self.granularity, self.shape, window, self.fa, self.sinks if sinks is None else sinks, self.meta)

    def check_matches(self, shape: ModelShape) -> None:
        if shape != self.shape:
            raise AllocationError(
                f"allocation is for {self.shape.num_layers} layers × {self.shape.num_kv_heads} KV heads "
                f"({self.shape.num_q_heads} query heads); the model has {shape.num_layers} × "
                f"{shape.num_kv_heads} ({shape.num_q_heads})"
            )

    # ---- statistics -----------------------------------------------------------------------------
    def fa_share_per_layer(self) -> list[float]:
        return [sum(row) / len(row) for row in self.fa]

    def fa_blocks(self) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of layers holding any FA head."""
        blocks, start = [], None
        for i, share in enumerate(self.fa_share_per_layer() + [0.0]):
            if share > 0 and start is None:
                start = i
            elif share == 0 and start is not None:
                blocks.append((start, i))
                start = None
        return blocks

    def contiguity(self) -> float:
        """1.0 when the layers with FA form one contiguous block; 1/k for k blocks; 0 with no FA."""
        blocks = self.fa_blocks()
        return 1.0 / len(blocks) if blocks else 0.0

    def stats(self) -> dict:
        shares = self.fa_share_per_layer()
        layers = len(shares)
        third = max(1, layers // 3)
        return {
            "granularity": self.granularity,
            "units": self.num_units,
            "swa_units": self.num_swa,
            "fa_units": self.num_units - self.num_swa,
            "sparsity": self.sparsity,
            "window": self.window,
            "sinks": self.sinks,
            "fa_share_per_layer": shares,
            "fa_blocks": self.fa_blocks(),
            "contiguity": self.contiguity(),
            "fa_share_bottom_third": sum(shares[:third]) / third,
            "fa_share_middle_third": sum(shares[third : layers - third]) / max(1, layers - 2 * third),
            "fa_share_top_third": sum(shares[layers - third :]) / third,
        }

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "granularity": self.granularity,
            "shape": {
                "num_layers": self.shape.num_layers,
                "num_kv_heads": self.shape.num_kv_heads,
                "num_q_heads": self.shape.num_q_heads,
            },
            "window": self.window,
            "sinks": self.sinks,
            "fa": [[int(b) for b in row] for row in self.fa],
            "num_swa_units": self.num_swa,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, doc: object) -> "Allocation":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AllocationError(f"not a consa allocation (expected format {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise AllocationError(f"unsupported allocation version {doc.get('version')!r} (this consa reads {VERSION})")
        try:
            shape = ModelShape(**doc["shape"])
            fa = doc["fa"]
            if not isinstance(fa, list) or not all(isinstance(r, list) for r in fa):
                raise AllocationError("'fa' must be a list of lists")
            if any(b not in (0, 1, True, False) for r in fa for b in r):
                raise AllocationError("'fa' entries must be 0 or 1")
            alloc = cls(doc["granularity"], shape, doc["window"], tuple(map(tuple, fa)), doc.get("sinks", 0), doc.get("meta") or {})
        except KeyError as e:
            raise AllocationError(f"allocation is missing the key {e.args[0]!r}") from None
        except TypeError as e:
            raise AllocationError(f"malformed allocation: {e}") from None
        if "num_swa_units" in doc and doc["num_swa_units"] != alloc.num_swa:
            raise AllocationError(
                f"allocation says {doc['num_swa_units']} SWA units but its bits hold {alloc.num_swa}"
            )
        return alloc

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Allocation":
        return cls.from_dict(read_json(path, "allocation file", AllocationError))
