"""Loss scaling (GradScaler) and error feedback: ``set_gradient_scale`` keeps the feedback exact.

Each rank trains the same model twice: once on plain gradients, once on gradients multiplied by
a loss scale that changes every few steps (as GradScaler's does) and divided by it again before
the optimizer step. Scales are powers of two, so scaling is exact in floating point and, with
``set_gradient_scale`` declared before each backward, the two runs must agree bit for bit. The
same scaled run without the declaration must not (its buffers would be off by the scale ratio),
which shows the test can fail.
"""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from models import batch, make_mlp

SMALL_BUCKETS_MB = 0.004
STEPS = 12
SCALES = [2.0**16] * 3 + [2.0**15] * 4 + [2.0**17] * 3 + [2.0**12] * 2  # an overflow halving, growth, ...
METHODS = {
    "topk-ef14": ("topk", {"density": 0.1, "feedback": "ef14", "warmup_steps": 1}),
    "topk-ef21": ("topk", {"density": 0.1, "feedback": "ef21", "warmup_steps": 1}),
    "topk-econtrol": ("topk", {"density": 0.1, "feedback": "econtrol", "eta": 0.5, "warmup_steps": 1}),
    "topk-ef21-sgdm": ("topk", {"density": 0.1, "feedback": "ef21-sgdm", "momentum": 0.5, "warmup_steps": 1}),
    "powersgd": ("powersgd", {"rank": 2, "min_compression_rate": 1.0, "warmup_steps": 1}),
}


def _train(rank: int, method: str, options: dict, scales: list[float] | None, declare: bool) -> list[torch.Tensor]:
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, method, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(STEPS):
        scale = scales[step] if scales is not None else 1.0
        if declare:
            state.set_gradient_scale(scale)
        x, y = batch(rank, step)
        optimizer.zero_grad()
        (torch.nn.functional.mse_loss(ddp(x), y) * scale).backward()
        for parameter in ddp.parameters():
            parameter.grad.div_(scale)
        optimizer.step()
    parameters = [p.detach().clone() for p in ddp.parameters()]
    saved_scale = state.state_dict()["gradient_scale"]
    state.close()
    return parameters + [torch.tensor(saved_scale if saved_scale is not None else -1.0)]


def _checks(rank: int, world_size: int) -> dict:
    out = {}
    for name, (method, options) in METHODS.items():
        plain = _train(rank, method, options, None, declare=False)
        declared = _train(rank, method, options, SCALES, declare=True)
        undeclared = _train(rank, method, options, SCALES, declare=False)
        out[name] = {
            "declared_equal": all(torch.equal(a, b) for a, b in zip(plain[:-1], declared[:-1])),
            "declared_difference": max(float((a - b).abs().max()) for a, b in zip(plain[:-1], declared[:-1])),
            "undeclared_difference": max(float((a - b).abs().max()) for a, b in zip(plain[:-1], undeclared[:-1])),
            "saved_scale": float(declared[-1]),
        }
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_checks, 2, timeout=240)


@pytest.mark.parametrize("name", list(METHODS))
def test_declared_scale_keeps_feedback_exact(results, name):
    for rank_results in results:
        got = rank_results[name]
        assert got["declared_equal"], f"{name}: scaled run differs from the plain one by {got['declared_difference']}"
        assert got["undeclared_difference"] > 1e-4, f"{name}: the test cannot tell scaled buffers apart"
        assert got["saved_scale"] == SCALES[-1]


def test_set_gradient_scale_rejects_bad_values():
    state = gcomp.TopKState(density=0.1)
    try:
        for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2", torch.ones(2)):
            with pytest.raises(ValueError, match="set_gradient_scale"):
                state.set_gradient_scale(bad)
        state.set_gradient_scale(torch.tensor(1024.0))
        state.set_gradient_scale(65536)
    finally:
        state.close()
