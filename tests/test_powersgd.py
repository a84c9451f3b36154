"""PowerSGD state invariants on 2 gloo ranks."""
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from models import batch, make_mlp, max_relative_error, train_steps

STEPS = 30


def _error_feedback_run(rank: int, world_size: int) -> dict:
    """Check ``local input == local output + residual`` on every compressed layer and step."""
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=0.004)
    state = gcomp.register(ddp, "powersgd", rank=2, warmup_steps=2)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    names = [name for name, _ in ddp.module.named_parameters()]
    worst = 0.0
    checked = 0
    for step in range(STEPS):
        x, y = batch(rank, step)
        before = {name: tensors["error"].clone() for name, tensors in state.layer_state.items() if "error" in tensors}
        local = torch.autograd.grad(torch.nn.functional.mse_loss(ddp.module(x), y), list(ddp.module.parameters()))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        for name, param, local_grad in zip(names, ddp.module.parameters(), local):
            after = state.layer_state.get(name, {}).get("error")
            if after is None:
                continue
            n = param.shape[0]
            local_input = local_grad.reshape(n, -1) + before.get(name, torch.zeros_like(after))
            recombined = param.grad.reshape(n, -1) + after
            worst = max(worst, float((local_input - recombined).norm() / local_input.norm()))
            checked += 1
        optimizer.step()
    q = {name: tensors["q"].clone() for name, tensors in state.layer_state.items()}
    residual_norm = sum(float(t["error"].norm()) for t in state.layer_state.values())
    stats = state.stats()
    state.close()
    return {"worst": worst, "checked": checked, "q": q, "residual_norm": residual_norm, "stats": stats}


def test_error_feedback_invariant_and_identical_q():
    first, second = run_ranks(_error_feedback_run, 2)
    for result in (first, second):
        assert result["checked"] >= (STEPS - 2) * 4
        assert result["worst"] < 1e-5
        assert result["residual_norm"] > 0  # the residual is real, not trivially zero
        assert result["stats"]["compressed_steps"] == STEPS - 2
    assert first["q"].keys() == second["q"].keys() and len(first["q"]) >= 4
    for name in first["q"]:
        assert torch.equal(first["q"][name], second["q"][name]), f"Q of {name} differs between ranks"


def _half_precision_run(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    options = {"rank": 32, "min_compression_rate": 0.01, "warmup_steps": 1}
    got = train_steps(rank, "powersgd", options, 4, 0.004, model=make_mlp().to(dtype))
    reference = train_steps(rank, "allreduce", {}, 4, 0.004, model=make_mlp().to(dtype))
    return {"error": max_relative_error(got["gradients"], reference["gradients"]), "finite": all(bool(torch.isfinite(g).all()) for g in got["gradients"])}


def test_half_precision_buckets():
    for dtype, tolerance in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        for result in run_ranks(_half_precision_run, 2, dtype):
            assert result["finite"]
            assert result["error"] < tolerance, (dtype, result)


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp()
        self.unused = nn.Linear(16, 64)  # its gradient is exactly zero on every step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + 0.0 * self.unused(x).sum()


def _zero_gradient_run(rank: int, world_size: int) -> dict:
    results = {}
    for epsilon in (0.0, 1e-8):
        for rank_setting in (1, 4):
            got = train_steps(rank, "powersgd", {"rank": rank_setting, "warmup_steps": 0, "orthogonalization_epsilon": epsilon}, 3, 25, model=_WithUnusedLayer())
            results[(epsilon, rank_setting)] = all(bool(torch.isfinite(g).all()) for g in got["gradients"])
    return results


def test_all_zero_layer_gives_no_nan():
    for result in run_ranks(_zero_gradient_run, 2):
        assert all(result.values()), result


def test_expected_bytes_per_step():
    """stats() counts exactly P, Q and dense leftovers."""
    [result] = run_ranks(_bytes_run, 1)
    assert result["sent"] == result["expected"]
    assert math.isclose(result["ratio"], result["uncompressed"] / result["expected"])


def _dense_and_factor_numel(model: nn.Module, rank: int) -> tuple[int, int]:
    """Elements sent per compressed step: dense leftovers, and P + Q of the compressed matrices
    (``(n + m) * rank`` each, compressed when that is 2x smaller than the matrix)."""
    dense = factors = 0
    for param in model.parameters():
        if param.dim() == 2 and (param.shape[0] + param.shape[1]) * rank * 2 < param.numel():
            factors += (param.shape[0] + param.shape[1]) * rank
        else:
            dense += param.numel()
    return dense, factors


def _bytes_run(rank: int, world_size: int) -> dict:
    model = make_mlp(width=64, depth=3)
    got = train_steps(rank, "powersgd", {"rank": 2, "warmup_steps": 1}, 3, 25, model=model)
    dense, compressed = _dense_and_factor_numel(model, rank=2)
    numel = sum(p.numel() for p in model.parameters())
    # step 0 dense; steps 1-2: [dense | P] and [Q], P + Q = (n + m) * rank per layer.
    expected = 4 * numel + 2 * 4 * (dense + compressed)
    stats = got["stats"]
    return {"sent": stats["bytes_sent"], "expected": expected, "ratio": stats["compression_ratio"], "uncompressed": stats["bytes_uncompressed"]}


def _factor_dtype_run(rank: int, world_size: int, factor_dtype: str) -> dict:
    """Half-precision factors: bytes, the feedback invariant, identical Q, and the loss."""
    torch.manual_seed(0)
    model = make_mlp(width=64, depth=3)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
    state = gcomp.register(ddp, "powersgd", rank=2, warmup_steps=1, factor_dtype=factor_dtype)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    names = [name for name, _ in ddp.module.named_parameters()]
    worst = 0.0
    losses = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        before = {name: tensors["error"].clone() for name, tensors in state.layer_state.items() if "error" in tensors}
        local = torch.autograd.grad(torch.nn.functional.mse_loss(ddp.module(x), y), list(ddp.module.parameters()))
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        losses.append(float(loss))
        for name, param, local_grad in zip(names, ddp.module.parameters(), local):
            after = state.layer_state.get(name, {}).get("error")
            if after is None:
                continue
            local_input = local_grad.reshape(param.shape[0], -1) + before.get(name, torch.zeros_like(after))
            worst = max(worst, float((local_input - (param.grad.reshape(param.shape[0], -1) + after)).norm() / local_input.norm()))
        optimizer.step()
    dense, compressed = _dense_and_factor_numel(model, rank=2)
    numel = sum(p.numel() for p in model.parameters())
    factor_bytes = 4 if factor_dtype == "float32" else 2
    result = {
        "sent": state.stats()["bytes_sent"],
        "expected": 4 * numel + (STEPS - 1) * (4 * dense + factor_bytes * compressed),
        "worst": worst,
        "q": {name: t["q"].clone() for name, t in state.layer_state.items() if "q" in t},
        "parameters": [p.detach().clone() for p in ddp.parameters()],
        "loss": sum(losses[-5:]) / 5,
    }
    state.close()
    return result


def test_half_precision_factors_halve_factor_bytes_and_feed_the_rounding_back():
    reference, _ = run_ranks(_factor_dtype_run, 2, "float32")
    assert reference["sent"] == reference["expected"]
    for factor_dtype in ("bfloat16", "float16"):
        first, second = run_ranks(_factor_dtype_run, 2, factor_dtype)
        for result in (first, second):
            assert result["sent"] == result["expected"] < reference["sent"], factor_dtype
            # local gradient + old residual == averaged output + new residual: the rounding of
            # the factors is in the residual, not lost
            assert result["worst"] < 1e-5, (factor_dtype, result["worst"])
        assert first["q"].keys() == reference["q"].keys() and first["q"]
        for name in first["q"]:
            assert first["q"][name].dtype == torch.float32
            assert torch.equal(first["q"][name], second["q"][name]), f"Q of {name} differs between ranks"
        for a, b in zip(first["parameters"], second["parameters"]):
            assert torch.equal(a, b)
        assert abs(first["loss"] - reference["loss"]) < 0.05 * reference["loss"], (factor_dtype, first["loss"], reference["loss"])


def _float16_overflow_run(rank: int, world_size: int) -> dict:
    """float16 factors of huge gradients overflow on the wire: every rank skips the step."""
    model = make_mlp(width=64, depth=3)
    ddp = DistributedDataParallel(model, bucket_cap_mb=25)
    state = gcomp.register(ddp, "powersgd", rank=2, warmup_steps=0, factor_dtype="float16")
    finite = []
    for step in range(3):
        x, y = batch(rank, step)
        scale = 1e9 if step == 1 and rank == 0 else 1.0  # only rank 0 overflows
        ddp.zero_grad()
        (scale * torch.nn.functional.mse_loss(ddp(x), y)).backward()
        finite.append(all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters()))
    stats = state.stats()
    state.close()
    return {"finite": finite, "skipped": stats["skipped_steps"]}


def test_float16_factor_overflow_skips_the_step_on_every_rank():
    for result in run_ranks(_float16_overflow_run, 2):
        assert result["finite"] == [True, False, True], result
        assert result["skipped"] == 1, result


def _dense_layers_mid_run(rank: int, world_size: int) -> dict:
    """Sending one matrix of a same-shape group dense mid-run (what the time-aware choice does)
    shrinks the group: its workspaces must be rebuilt, not reused at the old size."""
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=25)
    state = gcomp.register(ddp, "powersgd", rank=2, warmup_steps=1)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    names = [name for name, param in ddp.module.named_parameters() if param.dim() == 2]
    finite = []
    for step in range(6):
        if step == 3:
            state.set_dense_layers([names[1]])
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        finite.append(all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters()))
        optimizer.step()
    layers = state.stats()["layers"]
    state.close()
    return {"finite": finite, "dense_label": layers[names[1]]["setting"], "parameters": [p.detach().clone() for p in ddp.parameters()]}


def test_sending_a_grouped_matrix_dense_mid_run_regroups_cleanly():
    first, second = run_ranks(_dense_layers_mid_run, 2)
    for result in (first, second):
        assert all(result["finite"]), result["finite"]
        assert "dense" in result["dense_label"], result["dense_label"]
    for a, b in zip(first["parameters"], second["parameters"]):
        assert torch.equal(a, b)
