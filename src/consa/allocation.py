"""The Allocation: which attention units keep full attention (FA) and which become sliding-window (SWA).

An allocation is the one artefact every stage of consa exchanges: search and rules produce it, the
attention function and the hybrid cache consume it, export stores it. It knows nothing of transformers.

Units are whole layers (``granularity="layer"``) or single KV heads (``"kv_head"``; a KV head's bit is
shared by the query heads of its GQA group). Internally the bits are always expanded per KV head
(``fa[layer][kv_head]``), so consumers never branch on granularity.

Each unit also records what it keeps: ``span`` (the keys it sees back, self included; None = full
attention) and ``fixed`` (kept as the model has it, e.g. a native sliding layer of Gemma3 or
Mistral: never searched and not counted by the sparsity target). Format version 2 stores both per KV
head; searched SWA units may each have their own span (the span is the unit's own choice; for
``granularity="layer"`` the heads of a layer share one). ``window`` is then the *largest* searched span
(what an old consumer that knows one window would have to hold for every SWA unit to stay correct);
with one span it is that span, as always. Version-1 files (no spans, nothing fixed) load unchanged.
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
VERSION = 2
READABLE_VERSIONS = (1, 2)
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not (0.0 < float(sparsity) < 1.0) or math.isnan(sparsity):
        raise AllocationError(f"sparsity must be strictly between 0 and 1, got {sparsity!r}")
    return float(sparsity)


@dataclass(frozen=True)
class Allocation:
    """Per-unit FA/SWA bits plus everything needed to apply them identically everywhere.

    ``fa`` holds one tuple per layer with one bool per KV head (True = full attention). For
    ``granularity="layer"`` every head of a layer carries the same bit. ``fixed`` and ``span`` (per KV
    head, filled in when left out) say which units the model fixes and how far back each unit sees;
    counts (``num_units``, ``num_swa``, ``sparsity``) cover the searched units only. ``window`` is the
    largest span of the searched SWA units (their one span when they share it); :meth:`head_windows`
    gives what each head serves, :meth:`kv_slots` what the cache holds.
    """

    granularity: str
    shape: ModelShape
    window: int
    fa: tuple[tuple[bool, ...], ...]
    sinks: int = 0
    meta: dict = field(default_factory=dict, compare=False)
    fixed: tuple[tuple[bool, ...], ...] | None = None
    span: tuple[tuple[int | None, ...], ...] | None = None

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        if not _is_int(self.window) or self.window < 1:
            raise AllocationError(f"window must be an integer >= 1, got {self.window!r}")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise AllocationError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        fa = tuple(tuple(bool(b) for b in row) for row in self.fa)
        object.__setattr__(self, "fa", fa)
        self._check_grid(fa, "layers", "KV heads")
        for i, row in enumerate(fa):
            if self.granularity == "layer" and len(set(row)) > 1:
                raise AllocationError(f"layer-granularity allocation mixes FA and SWA heads in layer {i}")
        fixed = self.fixed if self.fixed is not None else [[False] * len(row) for row in fa]
        fixed = tuple(tuple(bool(b) for b in row) for row in fixed)
        self._check_grid(fixed, "rows of 'fixed'", "entries")
        object.__setattr__(self, "fixed", fixed)
        if self.span is None:
            span = tuple(tuple(None if f else self.window for f in row) for row in fa)
        else:
            span = tuple(tuple(None if s is None else s for s in row) for row in self.span)
        self._check_grid(span, "rows of 'span'", "entries")
        object.__setattr__(self, "span", span)
        for i in range(len(fa)):
            if self.granularity == "layer" and len(set(fixed[i])) > 1:
                raise AllocationError(f"layer-granularity allocation fixes only some heads of layer {i}")
            for h, (f, x, s) in enumerate(zip(fa[i], fixed[i], span[i])):
                if f != (s is None):
                    raise AllocationError(f"unit {i}:{h}: span must be null exactly for full-attention units, got {s!r}")
                if s is not None and (not _is_int(s) or s < 1):
                    raise AllocationError(f"unit {i}:{h}: span must be an integer >= 1, got {s!r}")
            if self.granularity == "layer" and len(set(span[i])) > 1:
                raise AllocationError(f"layer-granularity allocation gives layer {i} several spans {list(span[i])}")
        searched = [s for rf, rs in zip(fixed, span) for x, s in zip(rf, rs) if s is not None and not x]
        if searched and max(searched) != self.window:
            raise AllocationError(f"window {self.window} must be the largest span of the searched SWA units, {max(searched)}")

    def _check_grid(self, grid, rows: str, cols: str) -> None:
        if len(grid) != self.shape.num_layers:
            raise AllocationError(f"allocation has {len(grid)} {rows}, shape says {self.shape.num_layers} layers")
        for i, row in enumerate(grid):
            if len(row) != self.shape.num_kv_heads:
                raise AllocationError(f"layer {i} has {len(row)} {cols}, shape says {self.shape.num_kv_heads} KV heads")

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
        native: Sequence[int | None] | None = None,
    ) -> "Allocation":
        """Build from a flat per-unit FA vector (layer-major for kv_head units).

        ``native`` (per layer: the model's own sliding window, or None) marks layers the model already
        slides and that stay as they are: they are fixed SWA at that window, and ``units_fa`` covers
        the other layers' units only."""
        check_granularity(granularity)
        native = list(native) if native is not None else [None] * shape.num_layers
        if len(native) != shape.num_layers:
            raise AllocationError(f"native windows cover {len(native)} layers, shape says {shape.num_layers}")
        free = [i for i, w in enumerate(native) if w is None]
        per_layer = 1 if granularity == "layer" else shape.num_kv_heads
        n = len(free) * per_layer
        units = [bool(u) for u in units_fa]
        if len(units) != n:
            raise AllocationError(f"expected {n} {granularity} units, got {len(units)}")
        h = shape.num_kv_heads
        fa, fixed, span = [], [], []
        for i, w in enumerate(native):
            if w is None:
                j = free.index(i) * per_layer
                row = [units[j]] * h if granularity == "layer" else units[j : j + h]
                fa.append(row)
                fixed.append([False] * h)
                span.append([None if b else window for b in row])
            else:
                fa.append([False] * h)
                fixed.append([True] * h)
                span.append([w] * h)
        return cls(granularity, shape, window, tuple(map(tuple, fa)), sinks, dict(meta or {}),
                   tuple(map(tuple, fixed)), tuple(map(tuple, span)))

    @classmethod
    def from_spans(
        cls,
        spans_per_unit: Sequence[int | None],
        granularity: str,
        shape: ModelShape,
        sinks: int = 0,
        meta: dict | None = None,
        native: Sequence[int | None] | None = None,
        window: int | None = None,
    ) -> "Allocation":
        """Build from a flat per-unit span vector (layer-major, None = full attention; the searched
        units only when ``native`` fixes layers, as in :meth:`from_units`). ``window`` becomes the largest
        span; it must be given only when every unit is FA (there is no span to take it from)."""
        spans = list(spans_per_unit)
        for j, s in enumerate(spans):
            if s is not None and (not _is_int(s) or s < 1):
                raise AllocationError(f"unit {j}: span must be an integer >= 1 or None (full attention), got {s!r}")
        swa = [s for s in spans if s is not None]
        if swa:
            if window is not None and window != max(swa):
                raise AllocationError(f"window {window} must be the largest span, {max(swa)}")
            window = max(swa)
        elif window is None:
            raise AllocationError("an allocation without SWA units needs an explicit window")
        base = cls.from_units([s is None for s in spans], granularity, shape, window, sinks, meta, native)
        per_layer = 1 if granularity == "layer" else shape.num_kv_heads
        free = [i for i, w in enumerate(native if native is not None else [None] * shape.num_layers) if w is None]
        grid = [list(row) for row in base.span]
        for n, i in enumerate(free):
            for h in range(shape.num_kv_heads):
                grid[i][h] = spans[n * per_layer + (0 if per_layer == 1 else h)]
        return cls(granularity, shape, window, base.fa, sinks, base.meta, base.fixed, tuple(map(tuple, grid)))

    @staticmethod
    def free_units(native: Sequence[int | None], granularity: str, num_kv_heads: int) -> list[int]:
        """Flat indices (layer-major, over *all* units) of the units a method may choose: those of the
        layers ``native`` leaves at None. Scores over every unit are cut on these only."""
        per_layer = 1 if check_granularity(granularity) == "layer" else num_kv_heads
        return [i * per_layer + h for i, w in enumerate(native) if w is None for h in range(per_layer)]

    @classmethod
    def uniform(cls, fa: bool, granularity: str, shape: ModelShape, window: int, sinks: int = 0) -> "Allocation":
        return cls.from_units([fa] * shape.num_units(granularity), granularity, shape, window, sinks)

    # ---- views ----------------------------------------------------------------------------------
    def _searched(self) -> list[tuple[int, int]]:
        """(layer, head) of every searched unit (the first head stands for a layer unit)."""
        heads = 1 if self.granularity == "layer" else self.shape.num_kv_heads
        return [(i, h) for i in range(self.shape.num_layers) for h in range(heads) if not self.fixed[i][h]]

    @property
    def units(self) -> list[bool]:
        """Flat per-unit FA bits of the searched units (layer-major)."""
        return [self.fa[i][h] for i, h in self._searched()]

    @property
    def num_units(self) -> int:
        """Searched units (fixed units are not counted)."""
        return len(self._searched())

    @property
    def num_fixed(self) -> int:
        return self.shape.num_units(self.granularity) - self.num_units

    @property
    def num_swa(self) -> int:
        return sum(not u for u in self.units)

    @property
    def sparsity(self) -> float:
        return self.num_swa / self.num_units if self.num_units else 0.0

    @property
    def native(self) -> list[int | None]:
        """Per layer: the window of a layer whose units are all fixed SWA (a native sliding layer), else None."""
        return [row_s[0] if all(row_f) and row_s[0] is not None and len(set(row_s)) == 1 else None
                for row_f, row_s in zip(self.fixed, self.span)]

    def fa_heads(self, layer: int) -> list[int]:
        return [h for h, b in enumerate(self.fa[layer]) if b]

    def swa_heads(self, layer: int) -> list[int]:
        return [h for h, b in enumerate(self.fa[layer]) if not b]

    def layer_window(self, layer: int) -> tuple[int, int]:
        """(window, sinks) of the SWA heads of ``layer``: a native layer keeps its own window and no
        sinks. One window per layer is what the kernels serve today."""
        swa = self.swa_heads(layer)
        if not swa:
            return self.window, self.sinks
        spans = {self.span[layer][h] for h in swa}
        kinds = {self.fixed[layer][h] for h in swa}
        if len(spans) > 1 or len(kinds) > 1:
            raise AllocationError(f"layer {layer}: its SWA heads differ in span or origin; one window per layer is served")
        return spans.pop(), (0 if kinds.pop() else self.sinks)

    def head_windows(self, layer: int) -> list[tuple[int, int] | None]:
        """Per KV head of ``layer``: (span, sinks) of an SWA head (a fixed/native head keeps no sinks),
        None for an FA head. What the runtime serves; several spans in one layer are fine."""
        return [None if s is None else (s, 0 if x else self.sinks)
                for s, x in zip(self.span[layer], self.fixed[layer])]

    def spans(self) -> list[int]:
        """The distinct SWA spans held anywhere (fixed units included), ascending."""
        return sorted({s for row in self.span for s in row if s is not None})

    @property
    def multi_span(self) -> bool:
        """True when SWA units differ in span (more than one window to serve)."""
        return len(self.spans()) > 1

    def kv_slots(self, context: int) -> int:
        """KV slots (per batch row, per head dim, keys or values) held at ``context`` tokens, over all
        KV heads: an FA head holds ``context``, an SWA head min(context, span − 1 + sinks): the cost
        model the hybrid cache holds exactly."""
        if not _is_int(context) or context < 0:
            raise AllocationError(f"context must be an integer >= 0, got {context!r}")
        return sum(context if hw is None else min(context, hw[0] - 1 + hw[1])
                   for i in range(self.shape.num_layers) for hw in self.head_windows(i))

    def kv_share(self, context: int) -> float:
        """KV held at ``context`` relative to full attention on every head."""
        full = context * self.shape.num_layers * self.shape.num_kv_heads
        return self.kv_slots(context) / full if full else 0.0

    def with_window(self, window: int, sinks: int | None = None) -> "Allocation":
        """Every searched SWA unit at ``window`` (and ``sinks``); the same window keeps per-unit spans
        as they are, so ``with_window(a.window, sinks)`` only changes the sinks."""
        if window == self.window:
            return Allocation(self.granularity, self.shape, window, self.fa, self.sinks if sinks is None else sinks,
                              self.meta, self.fixed, self.span)
        span = tuple(tuple(s if (s is None or x) else window for s, x in zip(rs, rf)) for rs, rf in zip(self.span, self.fixed))
        return Allocation(self.granularity, self.shape, window, self.fa, self.sinks if sinks is None else sinks, self.meta,
                          self.fixed, span)

    def permuted(self, orders: Sequence[Sequence[int]], meta: dict | None = None) -> "Allocation":
        """The same units with each layer's KV heads in a new order (``orders[layer][new] = old``)."""
        pick = lambda grid: tuple(tuple(row[o] for o in order) for row, order in zip(grid, orders))  # noqa: E731
        return Allocation(self.granularity, self.shape, self.window, pick(self.fa), self.sinks,
                          self.meta if meta is None else meta, pick(self.fixed), pick(self.span))

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
            "spans": self.spans(),
            "sinks": self.sinks,
            "fixed_units": self.num_fixed,
            "native_windows": self.native,
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
            "span": [list(row) for row in self.span],
            "fixed": [[int(b) for b in row] for row in self.fixed],
            "num_swa_units": self.num_swa,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, doc: object) -> "Allocation":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AllocationError(f"not a consa allocation (expected format {FORMAT!r})")
        version = doc.get("version")
        if version not in READABLE_VERSIONS:
            raise AllocationError(f"unsupported allocation version {version!r} (this consa reads {', '.join(map(str, READABLE_VERSIONS))})")
        try:
            shape = ModelShape(**doc["shape"])
            fa = _grid(doc, "fa", lambda b: b in (0, 1, True, False), "0 or 1")
            fixed = span = None
            if version >= 2:  # version 1: nothing fixed, every SWA unit at the window
                fixed = _grid(doc, "fixed", lambda b: b in (0, 1, True, False), "0 or 1")
                span = _grid(doc, "span", lambda s: s is None or _is_int(s), "null or an integer")
            alloc = cls(doc["granularity"], shape, doc["window"], fa, doc.get("sinks", 0), doc.get("meta") or {}, fixed, span)
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


def _grid(doc: dict, key: str, ok, what: str) -> tuple[tuple, ...]:
    grid = doc[key]
    if not isinstance(grid, list) or not all(isinstance(r, list) for r in grid):
        raise AllocationError(f"{key!r} must be a list of lists")
    if not all(ok(b) for r in grid for b in r):
        raise AllocationError(f"{key!r} entries must be {what}")
    return tuple(map(tuple, grid))
