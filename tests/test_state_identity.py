"""State follows the right parameter, wire overflow cannot poison feedback, overrides are checked.

The model used here has two layers of the same shape that run in the opposite order to the one
they are defined in, each in a bucket of its own: DDP's first buckets follow definition order,
its rebuilt buckets (after step 1) follow backward order, so the bucket positions of the two
layers swap after the first step. State keyed by position would silently move to the other layer.
"""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.hooks.layout import ParameterNames

STEPS = 6
CHECKPOINT_AT = 3

CONFIGS = {
    "powersgd": ("powersgd", {"rank": 2, "min_compression_rate": 1.0}),
    "ef14": ("topk", {"density": 0.1, "feedback": "ef14"}),
    "ef21": ("topk", {"density": 0.1, "feedback": "ef21"}),
    "ef21-sgdm": ("topk", {"density": 0.1, "feedback": "ef21-sgdm"}),
    "econtrol": ("topk", {"density": 0.1, "feedback": "econtrol"}),
}
HOOKS = {"powersgd": (gcomp.PowerSGDState, gcomp.powersgd_hook), "topk": (gcomp.TopKState, gcomp.topk_hook)}


class Swapped(nn.Module):
    """``first`` is defined first and used last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(24, 24)
        self.second = nn.Linear(24, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.first(torch.tanh(self.second(x)))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 24, generator=generator), torch.randn(16, 4, generator=generator)


def _build(method: str, options: dict, attach: bool, model_state=None):
    model = Swapped()
    if model_state is not None:
        model.load_state_dict(model_state)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)  # one parameter per bucket
    if attach:
        state = gcomp.register(ddp, method, warmup_steps=0, **options)
    else:  # the PyTorch way, as Lightning and other frameworks register hooks
        state_type, hook = HOOKS[method]
        state = state_type(warmup_steps=0, **options)
        ddp.register_comm_hook(state, hook)
    return ddp, state


def _steps(ddp, optimizer, rank: int, steps: range) -> list[torch.Tensor]:
    gradients = []
    for step in steps:
        x, y = _batch(rank, step)
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
        optimizer.step()
    return gradients


def _run(rank: int, method: str, options: dict, attach: bool, directory: str, tag: str) -> list[torch.Tensor]:
    ddp, state = _build(method, options, attach)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gradients = _steps(ddp, optimizer, rank, range(CHECKPOINT_AT))
    path = os.path.join(directory, f"{tag}-rank{rank}.pt")
    torch.save({"model": ddp.module.state_dict(), "optim": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
    state.close()
    checkpoint = torch.load(path, weights_only=True)
    ddp, state = _build(method, options, attach, checkpoint["model"])  # a fresh DDP model
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    optimizer.load_state_dict(checkpoint["optim"])
    state.load_state_dict(checkpoint["gcomp"])
    gradients += _steps(ddp, optimizer, rank, range(CHECKPOINT_AT, STEPS))
    state.close()
    return gradients


def _identity_runs(rank: int, world_size: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as directory:
        for label, (method, options) in CONFIGS.items():
            out[label] = {
                "attach": _run(rank, method, options, True, directory, f"{label}-a"),
                "discovered": _run(rank, method, options, False, directory, f"{label}-d"),
            }
        # Without any module in reach, names fall back to first-sight positions, which follow
        # each parameter by identity through the rebuild (no randomness in top-k, so the
        # gradients must equal those of the named run exactly).
        original = ParameterNames.discover
        ParameterNames.discover = lambda self, state: False
        try:
            for label in ("ef14", "ef21", "econtrol"):
                method, options = CONFIGS[label]
                out[label]["positions"] = _run(rank, method, options, False, directory, f"{label}-p")
        finally:
            ParameterNames.discover = original
    return out


@pytest.fixture(scope="module")
def identity_runs():
    return run_ranks(_identity_runs, 2, timeout=300)


@pytest.mark.parametrize("label", list(CONFIGS))
def test_state_follows_parameters_without_attach(identity_runs, label):
    for result in identity_runs:
        runs = result[label]
        for key in [k for k in runs if k != "attach"]:
            for step, (got, expected) in enumerate(zip(runs[key], runs["attach"])):
                assert torch.equal(got, expected), f"{label} {key}: step {step} differs by {float((got - expected).abs().max())}"
    first = identity_runs[0][label]["attach"]
    assert len(first) == STEPS and all(torch.isfinite(g).all() for g in first)


# ---------------------------------------------------------------------------------------- overflow
def _half_wire_overflow(rank: int, world_size: int, feedback: str) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    ddp = DistributedDataParallel(model)
    state = gcomp.register(ddp, "topk", density=0.05, feedback=feedback, value_dtype="float16", warmup_steps=0)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=1000)
    records = []
    previous_scale = scaler.get_scale()
    # EF21-SGDM sends (1 - momentum) times a gradient change: larger targets make it overflow too.
    target_scale = 600.0 if feedback == "ef21-sgdm" else 30.0
    for step in range(16):
        generator = torch.Generator().manual_seed(10 * step + rank)
        x, y = torch.randn(16, 32, generator=generator), target_scale * torch.randn(16, 8, generator=generator)
        before = {name: {k: t.clone() for k, t in tensors.items()} for name, tensors in state.layer_state.items()}
        skipped_before = state.stats()["skipped_steps"]
        optimizer.zero_grad()
        state.set_gradient_scale(scaler.get_scale())
        scale = scaler.get_scale()
        scaler.scale(nn.functional.mse_loss(ddp(x), y)).backward()
        # The local scaled gradients are finite: only the float16 wire could overflow.
        scaler.step(optimizer)
        scaler.update()
        after = state.layer_state
        skipped = state.stats()["skipped_steps"] - skipped_before
        ratio = scale / previous_scale  # stored feedback follows the loss scale (exact: a power of 2)
        previous_scale = scale
        records.append(
            {
                "scale": scale,
                "skipped": skipped,
                "state_finite": all(torch.isfinite(t).all() for tensors in after.values() for t in tensors.values()),
                "state_unchanged": skipped == 0
                or (
                    before.keys() == after.keys()
                    and all(torch.equal(before[n][k] * ratio, after[n][k]) for n in before for k in before[n])
                ),
            }
        )
    state.close()
    return {"records": records, "parameters": [p.detach().clone() for p in ddp.parameters()]}


@pytest.mark.parametrize("feedback", ["ef14", "ef21", "ef21-sgdm", "econtrol"])
def test_float16_wire_overflow_skips_the_step_on_every_rank(feedback):
    results = run_ranks(_half_wire_overflow, 2, feedback, timeout=120)
    first, second = (r["records"] for r in results)
    assert [r["skipped"] for r in first] == [r["skipped"] for r in second], "ranks must skip together"
    skipped = [r for r in first if r["skipped"]]
    # EF21, EF21-SGDM and EControl start with one dense step; the first compressed step overflows.
    assert skipped and skipped[0]["scale"] == 65536.0, first
    for result in results:
        for record in result["records"]:
            assert record["state_finite"] and record["state_unchanged"], record
    # The scaler halved its scale until the messages fit; then training goes on, compressed.
    assert first[-1]["skipped"] == 0 and first[-1]["scale"] < 65536.0, first
    assert sum(1 for r in first if not r["skipped"]) >= 4, first
    for a, b in zip(results[0]["parameters"], results[1]["parameters"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()


# ---------------------------------------------------------------------------------------- overrides
def _override_errors(rank: int, world_size: int) -> dict:
    out = {}
    for label, method, options in (
        ("ranks", "powersgd", {"layer_ranks": {"first.weight": 1 + rank}, "min_compression_rate": 1.0}),
        ("unknown", "powersgd", {"layer_ranks": {"no_such.weight": 2}}),
        ("unknown_topk", "topk", {"layer_densities": {"first.weight": 0.1, "frist.weight": 0.2}}),
    ):
        ddp = DistributedDataParallel(Swapped())
        state = gcomp.register(ddp, method, warmup_steps=0, **options)
        x, y = _batch(rank, 0)
        try:
            nn.functional.mse_loss(ddp(x), y).backward()
            out[label] = "no error"
        except Exception as error:  # noqa: BLE001 - the message is what is tested
            out[label] = str(error)
        state.close()
    return out


def test_override_mismatch_and_unknown_names_raise_on_every_rank():
    for result in run_ranks(_override_errors, 2, timeout=120):
        assert "ranks disagree on the compression configuration" in result["ranks"], result["ranks"]
        assert "'overrides':{'first.weight':1}" in result["ranks"], result["ranks"]
        assert "unknown layers ['no_such.weight']" in result["unknown"], result["unknown"]
        assert "known layers: first.weight, first.bias, second.weight" in result["unknown"], result["unknown"]
        assert "unknown layers ['frist.weight']" in result["unknown_topk"], result["unknown_topk"]


def test_unknown_names_raise_for_states_built_before_any_model():
    state = gcomp.PowerSGDState(layer_ranks={"x": 2})
    state.attach(Swapped())
    assert state._unknown_override_names() == ["x"]


# ---------------------------------------------------------------------------------------- EF21-SGDM
def _sgdm_dense(rank: int, world_size: int) -> dict:
    model = Swapped()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    momentum = 0.9
    state = gcomp.register(ddp, "topk", feedback="ef21-sgdm", momentum=momentum, min_compression_rate=1e9, warmup_steps=1)
    averaged, expected, plain = [], [], []
    local_momentum = None
    for step in range(5):
        x, y = _batch(rank, step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        averaged.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        local = torch.cat([p.grad.flatten() for p in reference.parameters()])
        if step == 0:  # warm-up: a plain average
            target = local.clone()
        else:
            local_momentum = local.clone() if local_momentum is None else momentum * local_momentum + (1 - momentum) * local
            target = local_momentum.clone()
        dist.all_reduce(target)
        expected.append(target / world_size)
        mean = local.clone()
        dist.all_reduce(mean)
        plain.append(mean / world_size)
    settings = {layer["setting"] for layer in state.stats()["layers"].values()}
    state.close()
    return {"averaged": averaged, "expected": expected, "plain": plain, "settings": settings}


def test_ef21_sgdm_on_dense_layers_averages_momenta():
    for result in run_ranks(_sgdm_dense, 2, timeout=120):
        assert result["settings"] == {"dense"}, result["settings"]
        for step, (got, expected) in enumerate(zip(result["averaged"], result["expected"])):
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (step, float((got - expected).abs().max()))
        # Momentum really is in play: from step 2 on the output is not the plain average.
        assert all(not torch.allclose(result["averaged"][s], result["plain"][s]) for s in range(2, 5))
