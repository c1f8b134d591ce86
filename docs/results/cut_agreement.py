"""Share of each run-4 ConSA search's gates that agree with its final top-k cut (docs/RESULTS.md, run 4).

    PYTHONPATH=src python3 docs/results/cut_agreement.py
"""

import json
from pathlib import Path

import torch

from consa.gates import HardConcreteGates, cut_agreement, topk_swa

data = json.loads((Path(__file__).parent / "data" / "gpu-run4-allocations.json").read_text())
for run, by_sparsity in data.items():
    for t, methods in by_sparsity.items():
        for method, a in methods.items():
            if "log_alpha" not in a:
                continue  # rules and baselines have no gates
            units = [row[0] for row in a["fa"]] if method.endswith("layer") else [b for row in a["fa"] for b in row]
            gates = HardConcreteGates(len(a["log_alpha"]))
            gates.log_alpha.data = torch.tensor(a["log_alpha"])
            fa = topk_swa(gates.log_alpha, units.count(False))
            assert fa == units, f"{run} {t} {method}: the stored allocation is not the top-k cut of its gates"
            print(f"{run:14s} {t:7s} {method:14s} {cut_agreement(gates.prob_nonzero(), fa):.3f}")
