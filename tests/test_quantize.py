"""The quantization hook (bits 1/2/4/8/32, every feedback rule) on gloo ranks, its adaptive family,
and its options.

Spawning ranks costs seconds, so each spawn runs many checks and the test functions below assert
on their share of the results (module-scoped fixtures). Checks that leave a failed DDP behind run
in a spawn of their own.
"""
import math
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.adaptive.families import BitsFamily
from gcomp.adaptive.solver import solve
from gcomp.compress.quantize import quantized_message_bytes
from models import batch, make_mlp, max_relative_error, train_steps

SMALL_BUCKETS_MB = 0.004  # about one 32x32 layer per bucket: many equal-size buckets
FEEDBACKS = ("ef14", "ef21", "econtrol", "ef21-sgdm")
EXACT_STEPS = 6
IDENTITY_STEPS = 8
POISON_STEP = 5
TOTAL, SPLIT = 12, 6  # checkpoint: steps in all, steps before the save
ADAPTIVE = gcomp.AdaptiveConfig(every_steps=3, accumulate_steps=2)


def _build(options: dict, *, adaptive=False, seed: int = 0):
    ddp = DistributedDataParallel(make_mlp(depth=5, seed=seed), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, "quantize", adaptive=adaptive, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, state, optimizer


def _train(ddp, optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()


# ---------------------------------------------------------------------------------- rank-side checks
def _exact_path(rank: int) -> dict:
    """bits = 32 sends the raw float32 values through the whole message protocol (rate below 1,
    so every layer takes it): it must reproduce plain DDP."""
    reference = train_steps(rank, None, {}, EXACT_STEPS, SMALL_BUCKETS_MB)
    out = {}
    for feedback in FEEDBACKS:
        # EF21-SGDM averages momenta, not gradients; with momentum 0 it is EF21 bit for bit.
        options = {"bits": 32, "feedback": feedback, "momentum": 0.0, "warmup_steps": 1, "min_compression_rate": 0.5}
        got = train_steps(rank, "quantize", options, EXACT_STEPS, SMALL_BUCKETS_MB)
        out[feedback] = {
            "bitwise": all(torch.equal(a, b) for a, b in zip(got["gradients"], reference["gradients"])),
            "error": max_relative_error(got["gradients"], reference["gradients"]),
            "compressed_steps": got["stats"]["compressed_steps"],
            "layouts": got["layouts"],
            "settings": {layer["setting"] for layer in got["stats"]["layers"].values()},
        }
    return out


def _identical_parameters(rank: int) -> dict:
    """Every bit width and rounding mode leaves the same parameters on every rank."""
    out = {}
    for bits in (1, 2, 4, 8):
        for rounding in ("nearest", "stochastic"):
            options = {"bits": bits, "rounding": rounding, "feedback": "ef14" if bits != 2 else "ef21"}
            run = train_steps(rank, "quantize", options, IDENTITY_STEPS, SMALL_BUCKETS_MB)
            out[(bits, rounding)] = {
                "parameters": run["parameters"],
                "settings": {layer["setting"] for layer in run["stats"]["layers"].values()},
                "compression": run["stats"]["compression_ratio"],
            }
    # A float64 model: the message input is rounded to float32 and quantized (fed back as error).
    run = train_steps(rank, "quantize", {"bits": 4, "feedback": "ef21"}, IDENTITY_STEPS, SMALL_BUCKETS_MB, model=make_mlp().double())
    out["float64"] = {"parameters": run["parameters"], "settings": {layer["setting"] for layer in run["stats"]["layers"].values()}}
    return out


def _poisoned_run(rank: int, feedback: str) -> dict:
    """At POISON_STEP rank 1's gradient of the first layer (in the last bucket DDP reduces) is
    multiplied by inf; like GradScaler, the optimizer skips a step whose gradients are not finite."""
    ddp, state, optimizer = _build({"bits": 4, "feedback": feedback})
    gradients, before, after = [], None, None
    for step in range(POISON_STEP + 3):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        poison = None
        if step == POISON_STEP:
            before = state.state_dict()["layers"]
            if rank == 1:
                poison = ddp.module[0].weight.register_hook(lambda grad: grad * math.inf)
        loss.backward()
        if poison is not None:
            poison.remove()
        if step == POISON_STEP:
            after = state.state_dict()["layers"]
        gradient = torch.cat([p.grad.flatten() for p in ddp.parameters()])
        gradients.append(gradient)
        if bool(torch.isfinite(gradient).all()):
            optimizer.step()
    skipped = state.stats()["skipped_steps"]
    state.close()
    same = before.keys() == after.keys() and all(
        before[name].keys() == after[name].keys() and all(torch.equal(before[name][k], after[name][k]) for k in before[name])
        for name in before
    )
    return {
        "poisoned_step_finite": bool(torch.isfinite(gradients[POISON_STEP]).all()),
        "later_steps_finite": all(bool(torch.isfinite(g).all()) for g in gradients[POISON_STEP + 1 :]),
        "state_unchanged": same,
        "state_tensors": sum(len(tensors) for tensors in after.values()),
        "skipped_steps": skipped,
    }


def _checkpoint_run(rank: int, directory: str, name: str, options: dict, adaptive) -> dict:
    """Save every rank's state, rebuild DDP from scratch, load, continue: identical to no interruption."""
    ddp, state, optimizer = _build(options, adaptive=adaptive)
    _train(ddp, optimizer, rank, range(TOTAL))
    uninterrupted = [p.detach().clone() for p in ddp.parameters()]
    decisions = state.controller.decisions if state.controller is not None else 0
    state.close()

    ddp, state, optimizer = _build(options, adaptive=adaptive)
    _train(ddp, optimizer, rank, range(SPLIT))
    path = os.path.join(directory, f"{name}-rank{rank}.pt")
    torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
    state.close()
    del ddp, state, optimizer

    checkpoint = torch.load(path, weights_only=True)
    ddp, state, optimizer = _build(options, adaptive=adaptive, seed=123)
    ddp.module.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.load_state_dict(checkpoint["gcomp"])
    _train(ddp, optimizer, rank, range(SPLIT, TOTAL))
    resumed = [p.detach().clone() for p in ddp.parameters()]
    result = {
        "equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
        "difference": max(float((a - b).abs().max()) for a, b in zip(uninterrupted, resumed)),
        "steps": state.stats()["steps"],
        "saved_tensors": sum(len(tensors) for tensors in checkpoint["gcomp"]["layers"].values()),
        "decisions": (decisions, state.controller.decisions if state.controller is not None else 0),
    }
    state.close()
    return result


def _checkpoints(rank: int, directory: str) -> dict:
    cases = {
        "ef14": ({"bits": 4, "feedback": "ef14"}, False),
        "ef21-stochastic": ({"bits": 2, "feedback": "ef21", "rounding": "stochastic"}, False),
        "econtrol": ({"bits": 8, "feedback": "econtrol", "eta": 0.2}, False),
        "adaptive": ({"bits": 4, "feedback": "ef14"}, ADAPTIVE),
    }
    return {name: _checkpoint_run(rank, directory, name, options, adaptive) for name, (options, adaptive) in cases.items()}


def _adaptive(rank: int) -> dict:
    ddp, state, optimizer = _build({"bits": 4}, adaptive=ADAPTIVE)
    _train(ddp, optimizer, rank, range(10))
    out = {
        "choices": [record["choices"] for record in state.controller.history],
        "layer_bits": dict(state.layer_bits),
        "settings": {layer["setting"] for layer in state.stats()["layers"].values()},
    }
    state.close()
    return out


def _byte_count(rank: int, world_size: int) -> dict:
    """Bytes counted per compressed step: the packed messages plus the dense leftovers and one
    health flag per bucket, in the allreduce."""
    steps = 4
    ddp = DistributedDataParallel(make_mlp(width=256), bucket_cap_mb=25.0)
    state = gcomp.register(ddp, "quantize", bits=4, warmup_steps=1)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    stats = []
    for step in range(steps):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        optimizer.step()
        stats.append(state.stats())
    state.close()
    message_bytes = dense_numel = 0
    for param in ddp.module.parameters():
        size = quantized_message_bytes(param.numel(), 4, state.chunk)
        if size * 2 < 4 * param.numel():
            message_bytes += size
        else:
            dense_numel += param.numel()
    first, last = stats[0], stats[-1]
    buckets = (last["collectives"] - first["collectives"]) // (2 * (steps - 1))
    allreduce_bytes = 4 * (dense_numel + buckets)
    return {
        "sent": last["bytes_sent"] - first["bytes_sent"],
        "expected_sent": (steps - 1) * (allreduce_bytes + message_bytes),
        "received": last["bytes_received"] - first["bytes_received"],
        "expected_received": (steps - 1) * (allreduce_bytes + (world_size - 1) * message_bytes),
        "settings": {name: layer["setting"] for name, layer in last["layers"].items()},
    }


def _two_rank_checks(rank: int, world_size: int, directory: str) -> dict:
    return {
        "exact": _exact_path(rank),
        "identity": _identical_parameters(rank),
        "non_finite": {feedback: _poisoned_run(rank, feedback) for feedback in ("ef14", "ef21")},
        "checkpoint": _checkpoints(rank, directory),
        "adaptive": _adaptive(rank),
        "bytes": _byte_count(rank, world_size),
    }


# ---------------------------------------------------------------------------------- failures
def _first_step_error(rank: int, options: dict) -> str:
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, "quantize", **options)
    try:
        x, y = batch(rank, 0)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return str(error)
    finally:
        state.close()
    return "no error"


def _mixed_checkpoints(rank: int, directory: str) -> str:
    """Rank 0 resumes from a checkpoint holding EF21 estimates, rank 1 starts afresh: the sizes
    of the collectives would differ, so both ranks must raise."""
    path = os.path.join(directory, f"mixed-rank{rank}.pt")
    ddp, state, optimizer = _build({"bits": 4, "feedback": "ef21"})
    _train(ddp, optimizer, rank, range(3))
    torch.save(state.state_dict(), path)
    state.close()
    ddp, state, optimizer = _build({"bits": 4, "feedback": "ef21"})
    if rank == 0:
        state.load_state_dict(torch.load(path, weights_only=True))
    try:
        _train(ddp, optimizer, rank, range(1))
    except Exception as error:  # noqa: BLE001
        return str(error)
    finally:
        state.close()
    return "no error"


def _failure_checks(rank: int, world_size: int, directory: str) -> dict:
    return {
        "unknown_layer": _first_step_error(rank, {"bits": 4, "layer_bits": {"no.such.layer": 8}}),
        "layer_bits": _first_step_error(rank, {"bits": 4, "layer_bits": {"2.weight": 8 if rank == 0 else 2}}),
        "bits": _first_step_error(rank, {"bits": 4 if rank == 0 else 8}),
        "checkpoints": _mixed_checkpoints(rank, directory),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_two_rank_checks, 2, str(tmp_path_factory.mktemp("quantize-checkpoints")), timeout=400)


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> list[dict]:
    return run_ranks(_failure_checks, 2, str(tmp_path_factory.mktemp("quantize-failures")), timeout=200)


# ---------------------------------------------------------------------------------- tests
def test_32_bits_equals_plain_ddp(two_ranks):
    for result in two_ranks:
        for feedback, check in result["exact"].items():
            assert check["compressed_steps"] == EXACT_STEPS - 1, feedback
            assert check["layouts"] >= 4, "the model should span many buckets"
            assert check["settings"] == {"bits=32"}, "every layer must really go through the codec"
            if feedback == "ef14":
                # g + 0 packed exactly, summed 0 + g0/2 + g1/2: the same bits as DDP's g0/2 + g1/2.
                assert check["bitwise"], (feedback, check["error"])
            else:
                # Estimator rules add the mean change to the previous estimate: g_t = g_{t-1} + mean(
                # g_i' - g_i), exact in real numbers, a few float32 roundings off DDP's mean.
                assert check["error"] < 1e-5, (feedback, check)


def test_every_rank_holds_identical_parameters(two_ranks):
    first, second = (result["identity"] for result in two_ranks)
    assert first.keys() == second.keys()
    for case in first:
        assert all(torch.equal(a, b) for a, b in zip(first[case]["parameters"], second[case]["parameters"])), case
        assert all(bool(torch.isfinite(p).all()) for p in first[case]["parameters"]), case
    for bits in (1, 2, 4, 8):
        assert f"bits={bits}" in first[(bits, "nearest")]["settings"], bits
        # Stochastic rounding really draws noise: another result than rounding to nearest.
        nearest, stochastic = first[(bits, "nearest")]["parameters"], first[(bits, "stochastic")]["parameters"]
        if bits != 1:  # 1 bit (scaled sign) has no rounding to randomise
            assert not all(torch.equal(a, b) for a, b in zip(nearest, stochastic)), bits
    assert "bits=4" in first["float64"]["settings"]


def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(two_ranks):
    for result in two_ranks:
        for feedback, check in result["non_finite"].items():
            assert not check["poisoned_step_finite"], feedback  # both ranks see it, not only rank 1
            assert check["state_unchanged"], feedback
            assert check["state_tensors"] >= 5, feedback
            assert check["later_steps_finite"], feedback
            assert check["skipped_steps"] == 1, feedback


def test_resume_is_identical(two_ranks):
    for result in two_ranks:
        for name, check in result["checkpoint"].items():
            assert check["steps"] == TOTAL, name
            assert check["saved_tensors"] >= 5, (name, check)
            assert check["equal"], (name, check["difference"])
        uninterrupted, resumed = result["checkpoint"]["adaptive"]["decisions"]
        assert uninterrupted == resumed >= 3


def test_adaptive_decisions_are_identical_and_applied(two_ranks):
    first, second = (result["adaptive"] for result in two_ranks)
    assert first["choices"] and first["choices"] == second["choices"]
    assert first["layer_bits"] == second["layer_bits"] == {k: int(v) for k, v in first["choices"][-1].items()}
    assert all(setting == "dense" or setting.startswith("bits=") for setting in first["settings"])


def test_bytes_are_counted(two_ranks):
    for result in two_ranks:
        check = result["bytes"]
        assert check["sent"] == check["expected_sent"], check
        assert check["received"] == check["expected_received"], check
        assert check["settings"]["2.weight"] == "bits=4"
        assert check["settings"]["6.bias"] == "dense"  # 8 entries: the padded message would not pay


def test_mismatched_configurations_raise_on_every_rank(failures):
    for result in failures:
        assert "unknown layers ['no.such.layer']" in result["unknown_layer"], result["unknown_layer"]
        assert "ranks disagree on the compression configuration" in result["layer_bits"], result["layer_bits"]
        assert "ranks disagree on the compression configuration" in result["bits"], result["bits"]
        assert "ranks disagree on the quantized layers of a bucket" in result["checkpoints"], result["checkpoints"]


# ---------------------------------------------------------------------------------- no process group
def test_adaptive_family_gives_more_bits_to_the_layer_with_larger_error():
    """Four layers alike in shape; one's values are 100x larger than the others', so are its
    quantization errors. Within the uniform setting's total error, the fewest bytes come from
    moving the small layers to fewer bits and paying for their error with more bits on the large one."""
    state = gcomp.QuantizeState(bits=4)
    family = BitsFamily(state)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (64, 64)
    tensors = [torch.randn(shape, generator=generator, device="cpu") * scale for scale in (0.01, 0.01, 0.01, 1.0)]
    candidates = [family.candidates(shape) for _ in tensors]
    assert candidates[0] == [1, 2, 4, 8]
    errors = [family.errors(t, shape, options) for t, options in zip(tensors, candidates)]
    assert all(e.dtype == torch.float64 and e.device == t.device for e, t in zip(errors, tensors))
    for row in errors:  # wider codes err less (2 bits is ternary, coarser than the scaled sign)
        assert float(row[3]) < float(row[2]) < min(float(row[0]), float(row[1]))
    assert float(errors[3][2]) > 50 * float(errors[0][2])
    sizes = [[family.size(shape, bits) for bits in options] for options in candidates]
    assert sizes[0] == [float(quantized_message_bytes(64 * 64, bits, state.chunk)) for bits in (1, 2, 4, 8)]
    uniform = [options.index(4) for options in candidates]
    table = [row.tolist() for row in errors]
    budget = sum(table[layer][choice] for layer, choice in enumerate(uniform))
    solution = solve(sizes, table, budget, uniform)
    bits = [candidates[layer][choice] for layer, choice in enumerate(solution.choices)]
    assert not solution.used_fallback
    assert bits[3] > max(bits[:3]), bits
    assert solution.total_error <= budget
    assert solution.total_bytes < sum(sizes[layer][choice] for layer, choice in enumerate(uniform))
    state.close()


def test_the_reference_codec_keeps_every_tensor_on_the_input_device():
    """The pure-torch codec the hook calls, run on the "meta" device: a tensor created on the CPU
    would meet a meta tensor and raise."""
    buffer = torch.empty(1000, device="meta")
    for bits in (1, 2, 4, 8, 32):
        message = gcomp.ops.quantize_pack(buffer, [0, 300], [300, 700], bits, 64, seeds=[1, 2])
        assert message.device.type == "meta" and message.dtype == torch.uint8
        out = torch.empty(1000, device="meta")
        gcomp.ops.quantize_unpack_add_(out, torch.stack([message, message]), [0, 300], [300, 700], bits, 64, 0.5)


@pytest.mark.parametrize(
    "options, word",
    [
        ({"bits": 3}, "bits"),
        ({"bits": 0}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"chunk": 100}, "chunk"),
        ({"chunk": 0}, "chunk"),
        ({"chunk": "256"}, "chunk"),
        ({"rounding": "up"}, "rounding"),
        ({"feedback": "ef99"}, "feedback"),
        ({"eta": -1.0}, "eta"),
        ({"momentum": 1.0}, "momentum"),
        ({"min_compression_rate": 0}, "min_compression_rate"),
        ({"layer_bits": {"0.weight": 5}}, "layer_bits"),
        ({"layer_bits": {"0.weight": "8"}}, "layer_bits"),
    ],
)
def test_invalid_options_raise(options, word):
    with pytest.raises(ValueError, match=word):
        gcomp.QuantizeState(**options)


def test_layer_bits_must_be_a_mapping_of_names_and_config_is_plain():
    with pytest.raises(TypeError, match="layer_bits"):
        gcomp.QuantizeState(layer_bits=[("0.weight", 8)])
    with pytest.raises(TypeError, match="layer_bits"):
        gcomp.QuantizeState(layer_bits={0: 8})
    state = gcomp.QuantizeState(bits=8, chunk=64, rounding="stochastic", layer_bits={"0.weight": 2})
    assert state.config() == {
        "warmup_steps": 0, "bits": 8, "chunk": 64, "rounding": "stochastic", "feedback": "ef14", "eta": 0.1,
        "momentum": 0.9, "min_compression_rate": 2.0,
    }
    assert state.layer_overrides() == {"0.weight": 2}
    state.close()


def test_adaptive_config_rejects_unknown_bit_widths():
    with pytest.raises(ValueError, match="bit_widths"):
        gcomp.AdaptiveConfig(bit_widths=(3,))
