"""Run under torchrun (2 CPU processes): all-gathers FSDP2 issues in one gates-only search step,
with the teacher pass keeping layers gathered (consa's path) and with a plain teacher pass."""

import gc
import json
import sys

import torch
import torch.distributed.fsdp._fully_shard._fsdp_param_group as group_mod

from consa.tiny import tiny_model
from consa.train import search as search_mod
from consa.train.distributed import init_from_env, shutdown
from consa.train.search import Search
from consa.train.search_config import ScheduleConfig, SearchConfig, TargetConfig

calls = {"n": 0}
real = group_mod.foreach_all_gather


def counting(*args, **kwargs):
    calls["n"] += 1
    return real(*args, **kwargs)


group_mod.foreach_all_gather = counting  # count only: this is a measurement script, not library code
d = init_from_env("cpu")


def batches(step):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 101, (2, 32), generator=g)}


cfg = SearchConfig(TargetConfig(sparsity=0.5, window=4), seq_len=32, schedule=ScheduleConfig(steps=4), checkpoint_every=0)
s = Search(tiny_model("qwen3", num_layers=4), cfg, batches, sys.argv[1], progress=False, dist=d)
s.train_step()  # warm-up
calls["n"] = 0
s.train_step()
consa_path = calls["n"]


def plain_teacher(batch):
    with torch.no_grad():
        s.mix.z = torch.ones(s.shape.num_layers, s.shape.num_kv_heads)
        return search_mod.forward_logits(s.model, batch)


s._teacher_logits = plain_teacher
calls["n"] = 0
s.train_step()
if d.rank == 0:
    print(json.dumps({"consa": consa_path, "plain": calls["n"]}), flush=True)
# the sharded model (and gloo's work objects it holds) must go before the process group and the interpreter:
# left to interpreter finalization, their teardown took the GIL too late and aborted a rank about 1 run in 16
del s, plain_teacher
gc.collect()
shutdown(d)
