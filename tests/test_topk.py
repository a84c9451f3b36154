"""The top-k hook (EF14, EF21, EControl) on gloo ranks.

Spawning ranks costs seconds, so each spawn runs many checks and the test functions below assert
on their share of the results (module-scoped fixtures).
"""
import math
import os

import pytest
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.compress.sparse import sparse_message_layout
from models import batch, make_mlp, max_relative_error, train_steps

SMALL_BUCKETS_MB = 0.004  # about one 32x32 layer per bucket: many equal-size buckets
FEEDBACKS = ("ef14", "ef21", "econtrol")
# Rules whose state must survive checkpoints and overflow steps; EF21-SGDM at density 1 averages
# momenta, not gradients, so it is not in the density-1 == plain DDP check.
STATEFUL_FEEDBACKS = FEEDBACKS + ("ef21-sgdm",)
FULL_DENSITY_STEPS = 6
ETA_ZERO_STEPS = 12
REPLICATED_STEPS = 30
POISON_STEP = 6
COMPRESSION = {"density": 0.01, "feedback": "ef21", "warmup_steps": 2}
COMPRESSION_STEPS = 8
COMPRESSION_FIRST_SPARSE_STEP = 3  # step 2 initialises EF21's estimates densely
TOTAL, SPLIT = 14, 7  # checkpoint: steps in all, steps before the save


def _run(rank: int, options: dict, steps: int, *, width: int = 32, bucket_cap_mb: float = SMALL_BUCKETS_MB, poison_step: int = -1) -> dict:
    """Train ``make_mlp(width)`` with the top-k hook. At ``poison_step`` rank 1's gradient of the
    first layer's weight is multiplied by inf (that layer sits in the last bucket DDP reduces, so
    the earlier, finite buckets of the step have already staged their updates); like GradScaler,
    the optimizer skips a step whose gradients are not finite."""
    ddp = DistributedDataParallel(make_mlp(width=width), bucket_cap_mb=bucket_cap_mb)
    state = gcomp.register(ddp, "topk", **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gradients, stats, layers_before_poison, layers_after_poison, non_finite_layers = [], [], None, None, []
    for step in range(steps):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        poison = None
        if step == poison_step:
            layers_before_poison = state.state_dict()["layers"]
            if rank == 1:
                poison = ddp.module[0].weight.register_hook(lambda grad: grad * math.inf)
        loss.backward()
        if poison is not None:
            poison.remove()
        if step == poison_step:
            layers_after_poison = state.state_dict()["layers"]
        gradient = torch.cat([p.grad.flatten() for p in ddp.parameters()])
        gradients.append(gradient)
        if step == poison_step:
            non_finite_layers = [name for name, p in ddp.module.named_parameters() if not bool(torch.isfinite(p.grad).all())]
        if bool(torch.isfinite(gradient).all()):
            optimizer.step()
        stats.append(state.stats())
    result = {
        "gradients": gradients,
        "stats": stats,
        "layers": state.state_dict()["layers"],
        "layers_before_poison": layers_before_poison,
        "layers_after_poison": layers_after_poison,
        "non_finite_layers": non_finite_layers,
    }
    state.close()
    return result


def _same_layers(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[name].keys() == b[name].keys() and all(torch.equal(a[name][key], b[name][key]) for key in a[name]) for name in a
    )


def _full_density_errors(rank: int) -> dict:
    """Density 1 sent as real sparse messages (rate below 1) must reproduce plain DDP."""
    reference = train_steps(rank, None, {}, FULL_DENSITY_STEPS, SMALL_BUCKETS_MB)
    out = {}
    for feedback in FEEDBACKS:
        options = {"density": 1.0, "feedback": feedback, "warmup_steps": 1, "min_compression_rate": 0.5}
        got = train_steps(rank, "topk", options, FULL_DENSITY_STEPS, SMALL_BUCKETS_MB)
        settings = {layer["setting"] for layer in got["stats"]["layers"].values()}
        out[feedback] = {
            "error": max_relative_error(got["gradients"], reference["gradients"]),
            "compressed_steps": got["stats"]["compressed_steps"],
            "layouts": got["layouts"],
            "settings": settings,
        }
    return out


def _eta_zero_matches_ef21(rank: int) -> dict[str, list[bool]]:
    """EControl with eta = 0 and EF21-SGDM with momentum = 0 must both be EF21, step for step."""
    base = {"density": 0.1, "warmup_steps": 2}
    ef21 = train_steps(rank, "topk", {**base, "feedback": "ef21"}, ETA_ZERO_STEPS, SMALL_BUCKETS_MB)
    econtrol = train_steps(rank, "topk", {**base, "feedback": "econtrol", "eta": 0.0}, ETA_ZERO_STEPS, SMALL_BUCKETS_MB)
    sgdm = train_steps(rank, "topk", {**base, "feedback": "ef21-sgdm", "momentum": 0.0}, ETA_ZERO_STEPS, SMALL_BUCKETS_MB)
    return {
        "econtrol": [torch.equal(a, b) for a, b in zip(ef21["gradients"], econtrol["gradients"])],
        "ef21-sgdm": [torch.equal(a, b) for a, b in zip(ef21["gradients"], sgdm["gradients"])],
    }


def _replicated_estimates(rank: int) -> dict:
    cases = {
        "ef21": {"feedback": "ef21", "value_dtype": "float16"},
        "econtrol": {"feedback": "econtrol", "eta": 0.05, "value_dtype": "bfloat16"},
        "ef21-sgdm": {"feedback": "ef21-sgdm", "momentum": 0.8},
    }
    out = {}
    for name, options in cases.items():
        run = _run(rank, {"density": 0.05, "warmup_steps": 2, **options}, REPLICATED_STEPS)
        out[name] = {layer: tensors["estimate"] for layer, tensors in run["layers"].items() if "estimate" in tensors}
    return out


def _non_finite(rank: int) -> dict:
    out = {}
    for feedback in STATEFUL_FEEDBACKS:
        run = _run(rank, {"density": 0.1, "feedback": feedback, "warmup_steps": 2}, POISON_STEP + 3, poison_step=POISON_STEP)
        out[feedback] = {
            "poisoned_step_finite": bool(torch.isfinite(run["gradients"][POISON_STEP]).all()),
            "poisoned_layers": run["non_finite_layers"],
            "later_steps_finite": all(bool(torch.isfinite(g).all()) for g in run["gradients"][POISON_STEP + 1 :]),
            "state_unchanged": _same_layers(run["layers_before_poison"], run["layers_after_poison"]),
            "state_tensors": sum(len(tensors) for tensors in run["layers_after_poison"].values()),
            "skipped_steps": run["stats"][-1]["skipped_steps"],
        }
    return out


def _compression(rank: int, world_size: int) -> dict:
    model = make_mlp(width=256)
    run = _run(rank, COMPRESSION, COMPRESSION_STEPS, width=256, bucket_cap_mb=25.0)
    dense_numel = message_bytes = 0
    layer_message_bytes = {}
    for name, param in model.named_parameters():
        k = max(1, round(COMPRESSION["density"] * param.numel()))
        size = sparse_message_layout([param.numel()], [k], torch.float32).message_bytes
        if size * 2 < 4 * param.numel():
            message_bytes += size
            layer_message_bytes[name] = size
        else:
            dense_numel += param.numel()
    first, last = run["stats"][COMPRESSION_FIRST_SPARSE_STEP - 1], run["stats"][-1]
    steps = COMPRESSION_STEPS - COMPRESSION_FIRST_SPARSE_STEP
    buckets = (last["collectives"] - first["collectives"]) // (2 * steps)
    allreduce_bytes = 4 * (dense_numel + buckets)  # dense leftovers and one health flag per bucket
    return {
        "ratio_after_warmup": (last["bytes_uncompressed"] - first["bytes_uncompressed"]) / (last["bytes_sent"] - first["bytes_sent"]),
        "sent": last["bytes_sent"] - first["bytes_sent"],
        "expected_sent": steps * (allreduce_bytes + message_bytes),
        "received": last["bytes_received"] - first["bytes_received"],
        "expected_received": steps * (allreduce_bytes + (world_size - 1) * message_bytes),
        "layer_sent": last["layers"]["2.weight"]["bytes_sent"] - first["layers"]["2.weight"]["bytes_sent"],
        "expected_layer_sent": steps * layer_message_bytes["2.weight"],
        "settings": {name: layer["setting"] for name, layer in last["layers"].items()},
        "finite": all(bool(torch.isfinite(g).all()) for g in run["gradients"]),
    }


def _disagreeing_layer_densities(rank: int) -> str:
    """Ranks given different per-layer densities must fail on every rank, not hang."""
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, "topk", density=0.1, warmup_steps=0, layer_densities={"2.weight": 0.1 if rank == 0 else 0.2})
    try:
        x, y = batch(rank, 0)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return str(error)
    finally:
        state.close()
    return "no error"


def _build(options: dict):
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, "topk", **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, state, optimizer


def _train(ddp, optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()


def _checkpoint_run(rank: int, directory: str, extra_options: Optional[dict] = None) -> dict:
    """Per rule: save every rank's state, rebuild DDP, load, continue; compare with no interruption.
    ``extra_options``: further TopKState options (another exchange, for instance)."""
    out = {}
    for feedback in STATEFUL_FEEDBACKS:
        options = {"density": 0.1, "feedback": feedback, "warmup_steps": 3, "eta": 0.2, "momentum": 0.7, **(extra_options or {})}
        ddp, state, optimizer = _build(options)
        _train(ddp, optimizer, rank, range(TOTAL))
        uninterrupted = [p.detach().clone() for p in ddp.parameters()]
        state.close()

        ddp, state, optimizer = _build(options)
        _train(ddp, optimizer, rank, range(SPLIT))
        path = os.path.join(directory, f"{feedback}-rank{rank}.pt")
        torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
        state.close()
        del ddp, state, optimizer

        checkpoint = torch.load(path, weights_only=True)
        ddp = DistributedDataParallel(make_mlp(depth=5, seed=123), bucket_cap_mb=SMALL_BUCKETS_MB)
        ddp.module.load_state_dict(checkpoint["model"])
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = gcomp.TopKState(**options)
        state.load_state_dict(checkpoint["gcomp"])
        state.attach(ddp)
        ddp.register_comm_hook(state, gcomp.topk_hook)
        _train(ddp, optimizer, rank, range(SPLIT, TOTAL))
        resumed = [p.detach().clone() for p in ddp.parameters()]
        steps = state.stats()["steps"]
        state.close()
        out[feedback] = {
            "equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
            "difference": max(float((a - b).abs().max()) for a, b in zip(uninterrupted, resumed)),
            "steps": steps,
            "saved_tensors": sum(len(tensors) for tensors in checkpoint["gcomp"]["layers"].values()),
            "saved_exchange": checkpoint["gcomp"]["config"]["exchange"],
        }
    return out


def _two_rank_checks(rank: int, world_size: int, directory: str) -> dict:
    return {
        "full_density": _full_density_errors(rank),
        "checkpoint": _checkpoint_run(rank, directory),
        "eta_zero": _eta_zero_matches_ef21(rank),
        "replicated": _replicated_estimates(rank),
        "non_finite": _non_finite(rank),
        "compression": _compression(rank, world_size),
        "disagreement": _disagreeing_layer_densities(rank),  # last: it leaves a failed DDP behind
    }


def _four_rank_checks(rank: int, world_size: int) -> dict:
    return {"full_density": _full_density_errors(rank)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_two_rank_checks, 2, str(tmp_path_factory.mktemp("topk-checkpoints")), timeout=240)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_ranks(_four_rank_checks, 4, timeout=240)


@pytest.mark.parametrize("world", [2, 4])
def test_full_density_equals_plain_ddp(world, request):
    results = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    for result in results:
        for feedback, check in result["full_density"].items():
            assert check["error"] < 1e-5, (world, feedback, check)
            assert check["compressed_steps"] == FULL_DENSITY_STEPS - 1
            assert check["layouts"] >= 4, "the model should span many buckets"
            assert check["settings"] == {"density=1"}, "every layer must really be sent sparse"


def test_econtrol_with_zero_eta_and_sgdm_with_zero_momentum_equal_ef21(two_ranks):
    for result in two_ranks:
        for rule, same in result["eta_zero"].items():
            assert len(same) == ETA_ZERO_STEPS, rule
            assert all(same), (rule, same)


def test_replicated_estimate_is_identical_on_every_rank(two_ranks):
    first, second = (result["replicated"] for result in two_ranks)
    for rule in ("ef21", "econtrol", "ef21-sgdm"):
        assert first[rule].keys() == second[rule].keys() and len(first[rule]) >= 6, rule
        for layer in first[rule]:
            assert torch.equal(first[rule][layer], second[rule][layer]), (rule, layer)


def test_non_finite_step_leaves_state_untouched(two_ranks):
    for result in two_ranks:
        for feedback, check in result["non_finite"].items():
            assert not check["poisoned_step_finite"], feedback  # both ranks see it, not only rank 1
            assert "0.weight" in check["poisoned_layers"], feedback
            assert check["state_unchanged"], feedback
            assert check["state_tensors"] >= 7, feedback  # there was state to protect (all but the 8-entry bias)
            assert check["later_steps_finite"], feedback
            assert check["skipped_steps"] == 1, feedback


def test_compression_ratio_and_byte_count(two_ranks):
    for result in two_ranks:
        check = result["compression"]
        assert check["finite"]
        assert check["ratio_after_warmup"] >= 20, check
        assert check["sent"] == check["expected_sent"], check
        assert check["received"] == check["expected_received"], check
        assert check["layer_sent"] == check["expected_layer_sent"], check
        assert check["settings"]["2.weight"] == "density=0.01"
        assert check["settings"]["6.bias"] == "dense"  # 8 entries: a sparse message would not pay


def test_ranks_with_different_layer_densities_fail_cleanly(two_ranks):
    for result in two_ranks:
        # Overrides are part of the configuration every rank proves equal at its first step.
        assert "ranks disagree on the compression configuration" in result["disagreement"], result["disagreement"]
        assert "'overrides':{'2.weight':0.1}" in result["disagreement"], result["disagreement"]


def test_resume_is_identical(two_ranks):
    expected_tensors_per_layer = {"ef14": 1, "ef21": 2, "econtrol": 3, "ef21-sgdm": 3}
    for result in two_ranks:
        for feedback, check in result["checkpoint"].items():
            assert check["steps"] == TOTAL, feedback
            assert check["saved_tensors"] >= 8 * expected_tensors_per_layer[feedback], (feedback, check)
            assert check["equal"], (feedback, check["difference"])


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, error, word",
    [
        ({"density": 0}, ValueError, "density"),
        ({"density": 1.5}, ValueError, "density"),
        ({"density": -0.1}, ValueError, "density"),
        ({"density": float("nan")}, ValueError, "density"),
        ({"density": True}, ValueError, "density"),
        ({"density": "0.1"}, ValueError, "density"),
        ({"eta": -0.5}, ValueError, "eta"),
        ({"eta": float("inf")}, ValueError, "eta"),
        ({"feedback": "ef21-sgdm", "momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": float("nan")}, ValueError, "momentum"),
        ({"feedback": "ef22"}, ValueError, "ef14"),
        ({"feedback": None}, TypeError, "feedback"),
        ({"value_dtype": "float64"}, ValueError, "value_dtype"),
        ({"value_dtype": "int8"}, ValueError, "bfloat16"),
        ({"value_dtype": 16}, TypeError, "value_dtype"),
        ({"min_compression_rate": 0}, ValueError, "min_compression_rate"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"layer_densities": {"fc.weight": 2.0}}, ValueError, "layer_densities"),
        ({"layer_densities": {3: 0.1}}, TypeError, "layer_densities"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
def test_invalid_topk_options(options, error, word):
    with pytest.raises(error, match=word):
        gcomp.TopKState(**options)


def test_value_dtype_accepts_torch_dtypes_and_config_is_plain():
    state = gcomp.TopKState(value_dtype=torch.bfloat16, feedback="econtrol", eta=0.05, density=0.02)
    assert state.config() == {
        "warmup_steps": 10,
        "density": 0.02,
        "feedback": "econtrol",
        "eta": 0.05,
        "momentum": 0.9,
        "value_dtype": "bfloat16",
        "min_compression_rate": 2.0,
        "estimate_start": "dense",
        "exchange": "allgather",
    }
    assert "topk" in gcomp.METHODS
