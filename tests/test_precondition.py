"""Compress after preconditioning (precondition="adamw"): each rank's local AdamW direction is what
is compressed and averaged; the optimizer must be momentum-free SGD."""
import io
import logging
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.precondition import make_preconditioner
from distributed import run_ranks
from models import batch, make_mlp

BETAS, EPS = (0.9, 0.999), 1e-8


def _reference_directions(rank_gradients: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per step: the mean over ranks of each rank's own AdamW direction (bias-corrected), by hand."""
    world = len(rank_gradients)
    moments = [None] * world
    squares = [None] * world
    out = []
    for step in range(len(rank_gradients[0])):
        directions = []
        for rank in range(world):
            g = rank_gradients[rank][step].double()
            moments[rank] = g * (1 - BETAS[0]) if moments[rank] is None else moments[rank] * BETAS[0] + g * (1 - BETAS[0])
            squares[rank] = g * g * (1 - BETAS[1]) if squares[rank] is None else squares[rank] * BETAS[1] + g * g * (1 - BETAS[1])
            t = step + 1
            directions.append((moments[rank] / (1 - BETAS[0] ** t)) / ((squares[rank] / (1 - BETAS[1] ** t)).sqrt() + EPS))
        out.append(sum(directions) / world)
    return out


def _train(rank, world_size, method, options, steps=6, inject_inf_at=None, save_at=None, checkpoint=None, precondition="adamw"):
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    state = gcomp.register(ddp, method, precondition=precondition, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, weight_decay=0.01 if precondition == "adamw" else 0.0)
    start = 0
    if checkpoint is not None:
        saved = torch.load(io.BytesIO(checkpoint[rank]), weights_only=True)
        ddp.load_state_dict(saved["model"])
        state.load_state_dict(saved["gcomp"])
        start = saved["step"]
    local, averaged, saved_bytes = [], [], None
    for step in range(start, steps):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        if inject_inf_at == step and rank == 1:
            loss = loss * math.inf
        loss.backward()
        averaged.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
        if all(torch.isfinite(p.grad).all() for p in ddp.parameters()):
            optimizer.step()
        if save_at is not None and step + 1 == save_at:
            buffer = io.BytesIO()
            torch.save({"model": ddp.state_dict(), "gcomp": state.state_dict(), "step": step + 1}, buffer)
            saved_bytes = buffer.getvalue()
    moments_finite = all(torch.isfinite(t).all() for tensors in state.layer_state.values() for t in tensors.values())
    result = {"averaged": averaged, "params": [p.detach().clone() for p in ddp.parameters()], "saved": saved_bytes,
              "moments_finite": moments_finite, "skipped": state.stats()["skipped_steps"]}
    state.close()
    return result


def _local_gradients(rank, world_size, steps):
    """Each rank's own gradients along the preconditioned run's trajectory are not needed: with
    SGD at lr 0 the parameters stay put, so plain backward passes give the gradients."""
    torch.manual_seed(0)
    model = make_mlp()
    out = []
    for step in range(steps):
        x, y = batch(rank, step)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return out


def _dense_directions(rank, world_size, precondition="adamw"):
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    state = gcomp.register(ddp, "allreduce", precondition=precondition)
    averaged = []
    for step in range(5):
        x, y = batch(rank, step)
        ddp.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()  # no optimizer step: parameters stay put
        averaged.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
    state.close()
    return {"averaged": averaged, "local": _local_gradients(rank, world_size, 5)}


def test_allreduce_averages_each_ranks_own_adamw_direction():
    results = run_ranks(_dense_directions, 2)
    expected = _reference_directions([results[0]["local"], results[1]["local"]])
    for got, want in zip(results[0]["averaged"], expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0]["averaged"], results[1]["averaged"]):
        assert torch.equal(a, b)


LION_BETAS = (0.9, 0.99)


def _reference_lion_directions(rank_gradients: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per step: the mean over ranks of each rank's own Lion direction (Distributed Lion), by hand."""
    world = len(rank_gradients)
    moments = [torch.zeros_like(rank_gradients[0][0], dtype=torch.float64) for _ in range(world)]
    out = []
    for step in range(len(rank_gradients[0])):
        directions = []
        for rank in range(world):
            g = rank_gradients[rank][step].double()
            directions.append(torch.sign(moments[rank] * LION_BETAS[0] + g * (1 - LION_BETAS[0])))
            moments[rank] = moments[rank] * LION_BETAS[1] + g * (1 - LION_BETAS[1])
        out.append(sum(directions) / world)
    return out


def test_allreduce_averages_each_ranks_own_lion_direction():
    results = run_ranks(_dense_directions, 2, "lion")
    expected = _reference_lion_directions([results[0]["local"], results[1]["local"]])
    for got, want in zip(results[0]["averaged"], expected):
        assert torch.equal(got.double(), want)  # signs averaged over two ranks: -1, 0 or 1 exactly
    assert any(bool((got == 0).any()) for got in results[0]["averaged"])  # the ranks disagree somewhere


def _one_bit_lion_vs_dense(rank, world_size):
    options = {"bits": 1, "chunk": 64, "feedback": "ef14", "min_compression_rate": 1.0}
    one_bit = _train(rank, world_size, "quantize", options, precondition="lion")
    return one_bit, _train(rank, world_size, "allreduce", {}, precondition="lion")


def test_one_bit_carries_the_lion_direction_exactly():
    """A Lion direction is +-1 already: one bit per entry (scale = mean |x| = 1) loses nothing, so
    the one-bit run is Distributed Lion itself, step for step."""
    for one_bit, dense in run_ranks(_one_bit_lion_vs_dense, 2):
        for a, b in zip(one_bit["averaged"], dense["averaged"]):
            assert torch.equal(a, b)
        for a, b in zip(one_bit["params"], dense["params"]):
            assert torch.equal(a, b)


# The lossless setting of each compressed mode: top-k at density 1, and quantize at 32 bits (every
# entry sent as raw float32).
LOSSLESS = {
    "topk-density-1": ("topk", {"density": 1.0, "feedback": "ef14", "warmup_steps": 2, "min_compression_rate": 0.5}),
    "quantize-32-bits": ("quantize", {"bits": 32, "feedback": "ef14", "min_compression_rate": 0.5}),
    # EF21 from a zero estimate: the first message is the whole direction, so no dense step is needed.
    "quantize-32-bits-ef21-zero-start": ("quantize", {"bits": 32, "feedback": "ef21", "estimate_start": "zero", "min_compression_rate": 0.5}),
}
# EF21's estimate is a running sum of the averaged changes: its rounding grows with the steps (the
# directions are of order 1).
TOLERANCE = {"quantize-32-bits-ef21-zero-start": 2e-6}


def _lossless_vs_dense(rank, world_size, mode):
    method, options = LOSSLESS[mode]
    return _train(rank, world_size, method, options), _train(rank, world_size, "allreduce", {})


@pytest.mark.parametrize("mode", sorted(LOSSLESS))
def test_the_lossless_setting_equals_the_dense_preconditioned_average(mode):
    atol = TOLERANCE.get(mode, 1e-7)
    for compressed, dense in run_ranks(_lossless_vs_dense, 2, mode):
        for a, b in zip(compressed["averaged"], dense["averaged"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)  # rank-order sum vs allreduce sum
        for a, b in zip(compressed["params"], dense["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)


def _every_rule(rank, world_size):
    out = {}
    for feedback in ("ef14", "ef21", "ef21-sgdm", "econtrol"):
        out[feedback] = _train(rank, world_size, "topk", {"density": 0.05, "feedback": feedback, "warmup_steps": 1}, steps=5)
        out[f"quantize-1-{feedback}"] = _train(
            rank, world_size, "quantize", {"bits": 1, "chunk": 64, "feedback": feedback, "min_compression_rate": 1.0}, steps=5
        )
        out[f"momentum-{feedback}"] = _train(
            rank, world_size, "topk", {"density": 0.05, "feedback": feedback, "warmup_steps": 1}, steps=5, precondition="momentum"
        )
    for feedback in ("ef21", "econtrol", "ef21-sgdm"):
        out[f"quantize-1-{feedback}-zero-start"] = _train(
            rank, world_size, "quantize", {"bits": 1, "chunk": 64, "feedback": feedback, "estimate_start": "zero", "min_compression_rate": 1.0}, steps=5
        )
    out["lion-quantize-1-ef21"] = _train(
        rank, world_size, "quantize", {"bits": 1, "chunk": 64, "feedback": "ef21", "min_compression_rate": 1.0}, steps=5, precondition="lion"
    )
    out["powersgd"] = _train(rank, world_size, "powersgd", {"rank": 2, "warmup_steps": 1, "min_compression_rate": 1.0}, steps=5)
    return out


def test_every_rule_keeps_ranks_identical():
    first, second = run_ranks(_every_rule, 2, timeout=180)
    for name in first:
        for a, b in zip(first[name]["params"], second[name]["params"]):
            assert torch.equal(a, b), name
        assert all(torch.isfinite(p).all() for p in first[name]["params"]), name


# A sparse mode with a replicated estimate, and the one-bit mode with a residual.
RESUMED = {
    "topk-ef21": ("topk", {"density": 0.05, "feedback": "ef21", "warmup_steps": 2}),
    "quantize-1-bit-ef14": ("quantize", {"bits": 1, "chunk": 64, "feedback": "ef14", "min_compression_rate": 1.0}),
}


def _resume(rank, world_size, mode, checkpoints=None):
    """Eight steps saving at step 4 (checkpoints None), or resumed from those checkpoints."""
    method, options = RESUMED[mode]
    return _train(rank, world_size, method, options, steps=8, save_at=4 if checkpoints is None else None, checkpoint=checkpoints)


@pytest.mark.parametrize("mode", sorted(RESUMED))
def test_resume_is_bit_identical(mode):
    uninterrupted = run_ranks(_resume, 2, mode)
    resumed = run_ranks(_resume, 2, mode, [r["saved"] for r in uninterrupted])
    for one, other in zip(uninterrupted, resumed):
        for a, b in zip(one["params"], other["params"]):
            assert torch.equal(a, b)
    initial = list(make_mlp().parameters())
    assert not torch.equal(uninterrupted[0]["params"][0], initial[0])  # the eight steps moved the weights


def _overflow(rank, world_size, step):
    return _train(rank, world_size, "topk", {"density": 0.05, "feedback": "ef14", "warmup_steps": 2}, steps=5, inject_inf_at=step)


@pytest.mark.parametrize("step", [1, 3], ids=["in warm-up", "compressed"])
def test_an_overflow_on_one_rank_leaves_the_moments_finite(step):
    for result in run_ranks(_overflow, 2, step):
        assert result["skipped"] == 1 and result["moments_finite"]
        assert all(torch.isfinite(p).all() for p in result["params"])


def _optimizer(rank, world_size, kind, precondition="adamw"):
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp())
    state = gcomp.register(ddp, "topk", density=0.1, precondition=precondition)
    optimizer = {
        "adamw": lambda: torch.optim.AdamW(ddp.parameters(), lr=1e-3),
        "sgd-momentum": lambda: torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9),
        "sgd": lambda: torch.optim.SGD(ddp.parameters(), lr=1e-3, weight_decay=0.01),
    }[kind]()
    x, y = batch(rank, 0)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    try:
        optimizer.step()
        error = ""
    except ValueError as caught:
        error = str(caught)
    state.close()
    return error


@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum", "sgd"])
def test_a_mismatched_optimizer_is_refused_at_its_first_step(kind):
    for error in run_ranks(_optimizer, 2, kind):
        if kind == "sgd":
            assert error == ""
        else:
            assert "AdamW directions" in error and "torch.optim.SGD" in error, error


def test_a_second_momentum_is_refused():
    for error in run_ranks(_optimizer, 2, "sgd-momentum", "momentum"):
        assert "momentum buffers" in error and "momentum 0" in error, error


MISMATCHED = {"topk": {"density": 0.1}, "quantize": {"bits": 1, "chunk": 64}}


def _mismatch(rank, world_size, method):
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp())
    options = {"precondition": "adamw"} if rank == 0 else {}
    state = gcomp.register(ddp, method, **MISMATCHED[method], **options)
    x, y = batch(rank, 0)
    try:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        error = ""
    except Exception as caught:  # noqa: BLE001 - the message is what is checked
        error = str(caught)
    state.close()
    return error


@pytest.mark.parametrize("method", sorted(MISMATCHED))
def test_precondition_on_one_rank_only_raises_on_every_rank(method):
    for error in run_ranks(_mismatch, 2, method, timeout=90):
        assert "precondition" in error, error


def test_bad_options_raise():
    with pytest.raises(ValueError, match="precondition"):
        gcomp.PowerSGDState().set_preconditioner("adafactor")
    with pytest.raises(ValueError, match="betas"):
        gcomp.LocalAdamW(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas"):
        gcomp.LocalLion(betas=(1.5, 0.99))


def _six_steps(ddp, optimizer, rank):
    for step in range(6):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in ddp.parameters()]


def _sgd_with_momentum(rank):
    """Plain DDP stepped by SGD with momentum 0.9 at lr 0.01: what the momentum modes must equal."""
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    return _six_steps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9), rank)


def _momentum_vs_sgd_momentum(rank, world_size):
    """precondition="momentum" sent dense, stepped by momentum-free SGD, against plain DDP stepped
    by SGD with momentum 0.9 (the hook's default momentum)."""
    moved = _train(rank, world_size, "allreduce", {}, precondition="momentum")
    return moved["params"], _sgd_with_momentum(rank)


def _ef21_sgdm_vs_sgd_momentum(rank, world_size):
    """EF21-SGDM as the only momentum: lossless messages (32 bits) from zero estimates, stepped by
    momentum-free SGD at lr / (1 - momentum), against plain DDP stepped by SGD with that momentum at lr."""
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    state = gcomp.register(ddp, "quantize", bits=32, feedback="ef21-sgdm", momentum=0.9, estimate_start="zero",
                           min_compression_rate=0.5)
    moved = _six_steps(ddp, torch.optim.SGD(ddp.parameters(), lr=0.01 / (1 - 0.9)), rank)
    state.close()
    return moved, _sgd_with_momentum(rank)


def test_ef21_sgdm_as_the_only_momentum_is_sgd_with_momentum():
    """Why momentum-free SGD at lr / (1 - momentum) is EF21-SGDM's optimizer: its output is an
    average of gradients, SGD's momentum buffer a sum; lossless, the two steps are the same."""
    for moved, reference in run_ranks(_ef21_sgdm_vs_sgd_momentum, 2):
        for a, b in zip(moved, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(moved[0], list(make_mlp().parameters())[0])


def test_momentum_sent_dense_is_sgd_with_momentum():
    """Momentum is linear: averaging the ranks' buffers gives the buffer of the averaged gradients."""
    for moved, reference in run_ranks(_momentum_vs_sgd_momentum, 2):
        for a, b in zip(moved, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(moved[0], list(make_mlp().parameters())[0])


def test_bad_momentum_raises():
    with pytest.raises(ValueError, match="momentum"):
        gcomp.LocalMomentum(momentum=1.0)
    with pytest.raises(ValueError, match="'momentum'"):
        gcomp.PowerSGDState().set_preconditioner("nesterov")


def _scaled(rank, world_size, precondition, scales):
    """Dense steps at lr 0 with the loss multiplied by scales[t] and the state told so (what
    GradScaler does, including a changing scale): the averaged gradients come back in each step's
    loss scale."""
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    state = gcomp.register(ddp, "allreduce", precondition=precondition)
    averaged = []
    for step, scale in enumerate(scales):
        x, y = batch(rank, step)
        ddp.zero_grad()
        state.set_gradient_scale(scale)
        (torch.nn.functional.mse_loss(ddp(x), y) * scale).backward()
        averaged.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
    state.close()
    return averaged


@pytest.mark.parametrize("precondition", ["adamw", "momentum", "lion"])
def test_a_changing_loss_scale_scales_the_direction_and_not_the_moments(precondition):
    """The moments are kept unscaled, so each scaled step's direction is the unscaled run's times
    that step's scale (powers of two: exact up to the last bit of each operation)."""
    scales = [1024.0, 512.0, 2048.0]
    unscaled = run_ranks(_scaled, 2, precondition, [1.0] * len(scales))
    scaled = run_ranks(_scaled, 2, precondition, scales)
    for one, other, scale in zip(unscaled[0], scaled[0], scales):
        torch.testing.assert_close(other / scale, one, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(unscaled[0][1:], unscaled[0][:-1]))  # the steps differ


def _estimate_start(rank, world_size, start, saved=None):
    """Four one-bit EF21 steps from a dense or a zero start; with ``saved`` only rank 0 loads it."""
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=0.002)
    state = gcomp.register(ddp, "quantize", bits=1, chunk=64, feedback="ef21", estimate_start=start, min_compression_rate=1.0, precondition="adamw")
    if saved is not None and rank == 0:
        state.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, weight_decay=0.01)
    error = None
    try:
        for step in range(4):
            x, y = batch(rank, step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()
    except Exception as caught:  # noqa: BLE001 - the message is what is tested
        error = str(caught)
    buffer = io.BytesIO()
    if error is None:
        torch.save(state.state_dict(), buffer)
    result = {"stats": state.stats(), "params": [p.detach().clone() for p in ddp.parameters()], "saved": buffer.getvalue(), "error": error}
    state.close()
    return result


def test_a_zero_start_sends_no_dense_step():
    """estimate_start="zero" (quantize's default): the one-bit mode's EF21 compresses from its
    first step (every byte at 1 bit an entry); the dense start spends one step at full bytes."""
    assert gcomp.QuantizeState().estimate_start == "zero" and gcomp.TopKState().estimate_start == "dense"
    dense = run_ranks(_estimate_start, 2, "dense")
    zero = run_ranks(_estimate_start, 2, "zero")
    assert dense[0]["stats"]["dense_steps"] == 1 and zero[0]["stats"]["dense_steps"] == 0
    assert zero[0]["stats"]["bytes_sent"] < dense[0]["stats"]["bytes_sent"]
    for a, b in zip(zero[0]["params"], zero[1]["params"]):
        assert torch.equal(a, b)
    assert not torch.equal(zero[0]["params"][0], list(make_mlp().parameters())[0])


def test_an_estimate_held_on_one_rank_only_raises_on_every_rank():
    """With a zero start no layer is initialised densely, but a replicated estimate loaded on one
    rank only would still split the ranks' parameters: every rank refuses the step."""
    saved = run_ranks(_estimate_start, 2, "zero")[0]["saved"]
    for result in run_ranks(_estimate_start, 2, "zero", saved):
        assert result["error"] is not None and "ranks disagree" in result["error"], result["error"]


@pytest.mark.parametrize("state_class", [gcomp.QuantizeState, gcomp.TopKState])
def test_ef21_sgdm_on_a_direction_that_averages_gradients_warns(state_class, caplog):
    cases = [("adamw", True), (gcomp.LocalAdamW(betas=(0.0, 0.999)), False), ("momentum", True),
             (gcomp.LocalMomentum(momentum=0.0), False), ("lion", True)]
    for precondition, warns in cases:
        for feedback, momentum in (("ef21-sgdm", 0.9), ("ef21-sgdm", 0.0), ("ef21", 0.9)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="gcomp.hooks.message"):
                state_class(feedback=feedback, momentum=momentum).set_preconditioner(precondition)
            expected = warns and feedback == "ef21-sgdm" and momentum > 0
            assert ("two momenta" in caplog.text) == expected, (precondition, feedback, momentum, caplog.text)
            if expected:
                hint = make_preconditioner(precondition).single_momentum_hint()
                assert hint in caplog.text
