"""The output of a LoRA heal written without merging (``consa heal --lora R --no-merge``): the PEFT
adapter, the allocation and a record naming the base model directory. :func:`load_unmerged` rebuilds
the healed model from the three; ``consa.export.load`` (``consa.load``) calls it for such a folder and
hands itself in to load the base model (which may be an export too). Loading needs no training code:
only the model adapter and PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .allocation import Allocation
from .errors import ConsaError
from .files import read_json
from .models import apply_allocation, model_shape


class AdapterError(ConsaError, ValueError):
    """An unmerged heal output that cannot be loaded (no record, no base model, no PEFT)."""


def is_unmerged(path) -> bool:
    """A folder with a PEFT adapter and no model of its own (or the adapter folder itself)."""
    p = Path(path)
    return not (p / "config.json").is_file() and any((d / "adapter_config.json").is_file() for d in (p / "adapter", p))


def load_unmerged(path, load_base: Callable, *, dtype=None, device=None, backend: str = "auto"):
    """The healed model of a ``merge=False`` LoRA heal (its output folder, or the adapter folder in it): the
    base model ``heal.json`` names (loaded by ``load_base(dir, dtype=, backend=)``), the stored allocation
    applied, then the adapter (a ``PeftModel``; ``merge_and_unload()`` gives a plain model). Same order as
    ``consa.train.heal.Heal`` (allocation, then PEFT), so the logits are the merged output's."""
    p = Path(path)
    out, adapter = (p, p / "adapter") if (p / "adapter" / "adapter_config.json").is_file() else (p.parent, p)
    record = out / "heal.json"
    if not record.is_file():
        raise AdapterError(f"{p} holds a PEFT adapter but no consa heal record ({record}): load its base model and "
                           "apply the adapter with peft")
    base = (read_json(record, "heal record", AdapterError) or {}).get("source_model")
    if not base:
        raise AdapterError(f"{record} names no base model directory (the heal was given a model in memory): load the "
                           f"base model and apply {adapter} with peft")
    if not Path(base).is_dir():
        raise AdapterError(f"the base model directory {base} named in {record} no longer exists (the adapter in "
                           f"{adapter} needs it)")
    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError(f"loading the LoRA adapter {adapter} needs PEFT: pip install 'consa[peft]'") from None
    alloc = Allocation.load(out / "allocation.json")
    model = load_base(base, dtype=dtype, backend=backend)
    alloc.check_matches(model_shape(model))
    apply_allocation(model, alloc, backend=backend)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"cannot load the adapter {adapter} onto {base}: {first}") from None
    if device:
        model.to(device)
    return model.eval()
