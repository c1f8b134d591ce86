"""Multi-process search on PyTorch's own stack: torchrun + FSDP2 (``fully_shard``) + DCP.

What is sharded and what is replicated (see docs/DISTRIBUTED.md):

* the model (the gated student; the frozen teacher copy when weights train) is sharded with FSDP2,
  one ``fully_shard`` per decoder layer and one for the root, each decoder layer wrapped in
  non-reentrant activation checkpointing first (``torch.distributed._composable.checkpoint``,
  which keeps parameter names unchanged);
* the gates (log α, fp32), their Adam state, the Lagrange multiplier and the gate-noise generator are
  *replicated*: every rank holds the same values, seeds the generator with the same seed, averages the
  gate gradient with an all-reduce and so computes the same update; after each step rank 0's copy is
  broadcast anyway (N + 2 floats), so the ranks cannot drift apart even by rounding;
* each global batch ``batch_fn(step)`` is split into contiguous row slices, rank r taking the r-th.

Everything here is a thin layer over ``torch.distributed``; nothing is home-made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import ConsaError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun / ``torch.distributed.run``."""
    return all(k in os.environ for k in ENV_KEYS)


def exit_process(code: int) -> None:
    """End a command's process with ``code``. A rank under torchrun skips the interpreter's teardown
    (output flushed, logging shut down first): objects still holding the destroyed process group's mesh
    (the sharded model a command returns) are freed during finalization, where gloo's worker threads
    now and then abort a rank ("terminate called without an active exception", SIGABRT) after the job
    itself succeeded."""
    if not launched_by_torchrun():
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else 1)


@dataclass
class Dist:
    """This process's place in the job. ``Dist()`` is the single-process job (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    activation_checkpointing: bool = True
    mesh: object = None

    @property
    def enabled(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on a single process) -------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)  # gloo has no AVG: sum, then divide
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            tdist.broadcast(t, src=src)
        return t

    def local_batch(self, batch: dict) -> dict:
        """Rank r's contiguous slice of a global batch (every tensor whose first dim is the batch)."""
        if not self.enabled:
            return batch
        lead = batch.get("input_ids")
        if lead is None:
            lead = batch.get("inputs_embeds")
        if lead is None:
            raise ConsaError("a search batch needs input_ids or inputs_embeds")
        b = lead.shape[0]
        check_batch_split(b, self.world_size)
        n = b // self.world_size
        lo, hi = self.rank * n, (self.rank + 1) * n
        return {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == b else v) for k, v in batch.items()}


def check_batch_split(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConsaError(
            f"the global batch of {batch_size} sequences cannot be split evenly over {world_size} processes; "
            f"choose a --batch-size divisible by {world_size}"
        )


def init_from_env(device: str = "auto", activation_checkpointing: bool = True) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) and build a 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, local = (int(os.environ[k]) for k in ENV_KEYS)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConsaError("--device cuda asked for, but no CUDA device is available")
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    mesh = init_device_mesh(dev.type, (world,))
    return Dist(rank, world, local, dev, activation_checkpointing, mesh)


def shutdown(d: Dist | None) -> None:
    if d is not None and d.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


# ---- sharding ---------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (the classes a model lists in ``_no_split_modules``), in order."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # fallback: the ModuleList that holds one block per layer
        n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        for m in model.modules():
            if isinstance(m, nn.ModuleList) and len(m) == n:
                return list(m)
        raise ConsaError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return layers


def shard(model: nn.Module, d: Dist, mixed_precision: bool = False) -> nn.Module:
    """Activation checkpointing + ``fully_shard`` per decoder layer, then the root (in place).

    Params move to ``d.device`` shard by shard, so a model loaded on the CPU never sits whole on a GPU.
    ``mixed_precision`` (fp32 master weights, bf16 compute) is for weight training on GPU; gates-only
    runs load the model in bf16 directly.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": d.mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        if d.activation_checkpointing:
            checkpoint(layer)  # non-reentrant: gradients still reach the gates, read from outside
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def shard_pair(student, teacher, dist: "Dist", mixed_precision: bool):
    """Shard a student and its frozen teacher (None: none) alike: one rule for search and heal."""
    student = shard(student, dist, mixed_precision=mixed_precision)
    return student, (shard(teacher, dist, mixed_precision=mixed_precision) if teacher is not None else None)


def world_from_args(nproc: int | None, batch_size: int) -> tuple[bool, int]:
    """(launched by torchrun?, world size) for a command with ``--nproc``: torchrun's world size when it
    launched us (``--nproc`` must then agree), else ``--nproc`` (default 1); the batch must split evenly."""
    under = launched_by_torchrun()
    if nproc is not None and nproc < 1:
        raise ConsaError(f"--nproc must be >= 1, got {nproc}")
    world = int(os.environ["WORLD_SIZE"]) if under else (nproc or 1)
    if under and nproc not in (None, world):
        raise ConsaError(f"--nproc {nproc} disagrees with torchrun's world size {world}")
    check_batch_split(batch_size, world)
    return under, world


# ---- launching --------------------------------------------------------------------------------
def worker_argv(parser, args, command: str) -> list[str]:
    """``[command, --opt value, ...]`` rebuilt from parsed ``args`` for the processes :func:`launch`
    starts, minus ``--nproc`` (they are the processes; torchrun's world size says how many)."""
    import argparse

    argv = []
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "nproc"):
            continue
        v = getattr(args, a.dest, None)
        if isinstance(a, argparse._StoreTrueAction):
            if v:
                argv.append(a.option_strings[0])
        elif v is not None:
            argv += [a.option_strings[0], str(v)]
    return [command, *argv]


def launch(module_argv: list[str], nproc: int) -> int:
    """Run ``python -m consa <module_argv>`` on ``nproc`` local processes through torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "consa", *module_argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
