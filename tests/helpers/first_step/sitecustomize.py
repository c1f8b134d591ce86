"""Test instrumentation, imported at start-up by every Python process that has this folder on its
PYTHONPATH (tests/test_distributed.py puts it there for the torchrun ranks).

With ``CONSA_TEST_FIRST_STEP=DIR`` set, each process saves the gradients its first optimizer step
receives to ``DIR/rank<RANK>.safetensors``: after the gradient all-reduce, and before Adam, whose
division by sqrt(v) would amplify reduction-order rounding into whole learning-rate steps.
"""

import os


def record_first_step(path: str):
    """Save the gradients of the first ``Optimizer.step`` in this process to ``path``; returns the hook handle."""
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def hook(opt, args, kwargs):
        if not os.path.exists(path):
            ps = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            save_file({f"grad{i}": p.grad.detach().cpu().contiguous() for i, p in enumerate(ps)}, path)

    return register_optimizer_step_pre_hook(hook)


if os.environ.get("CONSA_TEST_FIRST_STEP"):
    record_first_step(os.path.join(os.environ["CONSA_TEST_FIRST_STEP"], f"rank{os.environ.get('RANK', '0')}.safetensors"))
