"""Top-k with shared indices (``exchange="shared_indices"``): bytes per rank that do not grow with
the world size, on gloo ranks, plus the cost model that predicts those bytes.

Spawning ranks costs seconds, so each spawn runs many checks (module-scoped fixtures), reusing the
training helpers of ``test_topk.py``.
"""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.comm.cost import Collective, Link, collective_cost, communication_cost
from gcomp.hooks.exchange import SharedIndicesExchange, make_exchange
from gcomp.hooks.topk import topk_step_collectives, topk_step_cost
from models import batch, make_mlp, max_relative_error, train_steps
from test_topk import SMALL_BUCKETS_MB, STATEFUL_FEEDBACKS, _checkpoint_run, _run, _same_layers

SHARED = {"exchange": "shared_indices"}
FULL_DENSITY_STEPS = 6
IDENTICAL_STEPS = 16
POISON_STEP = 6
BYTES_STEPS, BYTES_FIRST_SPARSE_STEP = 9, 3  # warm-up 2, then EF21's dense initialisation


def _full_density(rank: int, feedbacks: tuple[str, ...]) -> dict:
    """Density 1 (every entry selected by the leader) must reproduce plain DDP."""
    reference = train_steps(rank, None, {}, FULL_DENSITY_STEPS, SMALL_BUCKETS_MB)
    out = {}
    for feedback in feedbacks:
        options = {"density": 1.0, "feedback": feedback, "warmup_steps": 1, "min_compression_rate": 0.5, **SHARED}
        got = train_steps(rank, "topk", options, FULL_DENSITY_STEPS, SMALL_BUCKETS_MB)
        out[feedback] = {
            "error": max_relative_error(got["gradients"], reference["gradients"]),
            "exact": all(torch.equal(a, b) for a, b in zip(got["gradients"], reference["gradients"])),
            "compressed_steps": got["stats"]["compressed_steps"],
            "settings": {layer["setting"] for layer in got["stats"]["layers"].values()},
            "layouts": got["layouts"],
        }
    return out


def _identical_parameters(rank: int) -> dict:
    """Every rule, also with float16 values (their own allreduce) and a float64 model."""
    cases = {feedback: {"feedback": feedback} for feedback in STATEFUL_FEEDBACKS}
    cases["ef21-float16-values"] = {"feedback": "ef21", "value_dtype": "float16"}
    cases["econtrol-bfloat16-values"] = {"feedback": "econtrol", "value_dtype": "bfloat16"}
    out = {}
    for name, options in cases.items():
        got = train_steps(rank, "topk", {"density": 0.05, "warmup_steps": 2, **SHARED, **options}, IDENTICAL_STEPS, SMALL_BUCKETS_MB)
        out[name] = {"parameters": got["parameters"], "finite": all(bool(torch.isfinite(g).all()) for g in got["gradients"])}
    got = train_steps(rank, "topk", {"density": 0.05, "warmup_steps": 2, **SHARED}, IDENTICAL_STEPS, SMALL_BUCKETS_MB,
                      model=make_mlp().double())
    out["ef21-float64-model"] = {"parameters": got["parameters"], "finite": all(bool(torch.isfinite(g).all()) for g in got["gradients"])}
    run = _run(rank, {"density": 0.05, "warmup_steps": 2, "feedback": "ef21", **SHARED}, IDENTICAL_STEPS)
    out["estimates"] = {layer: tensors["estimate"] for layer, tensors in run["layers"].items() if "estimate" in tensors}
    return out


def _non_finite(rank: int) -> dict:
    out = {}
    for feedback in STATEFUL_FEEDBACKS:
        run = _run(rank, {"density": 0.1, "feedback": feedback, "warmup_steps": 2, **SHARED}, POISON_STEP + 3, poison_step=POISON_STEP)
        out[feedback] = {
            "poisoned_step_finite": bool(torch.isfinite(run["gradients"][POISON_STEP]).all()),
            "later_steps_finite": all(bool(torch.isfinite(g).all()) for g in run["gradients"][POISON_STEP + 1 :]),
            "state_unchanged": _same_layers(run["layers_before_poison"], run["layers_after_poison"]),
            "state_tensors": sum(len(tensors) for tensors in run["layers_after_poison"].values()),
            "skipped_steps": run["stats"][-1]["skipped_steps"],
        }
    return out


def _bytes(rank: int, world_size: int) -> dict:
    """stats() against the cost model, byte for byte, for both exchanges and both value paths."""
    out = {}
    cases = {
        "allgather": {"exchange": "allgather"},
        "shared_indices": SHARED,
        "shared_indices-float16-values": {**SHARED, "value_dtype": "float16"},
    }
    for name, options in cases.items():
        ddp = DistributedDataParallel(make_mlp(width=256), bucket_cap_mb=25.0)
        state = gcomp.register(ddp, "topk", density=0.01, feedback="ef21", warmup_steps=2, **options)
        buckets = {}
        reduce = state.reduce

        def recording(buffer, layout, step, reduce=reduce, buckets=buckets):
            buckets.setdefault(step, []).append([slot.numel for slot in layout.layers])
            return reduce(buffer, layout, step)

        state.reduce = recording
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        snapshots = []
        for step in range(BYTES_STEPS):
            x, y = batch(rank, step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()
            snapshots.append(state.stats())
        state.close()
        first, last = snapshots[BYTES_FIRST_SPARSE_STEP - 1], snapshots[-1]
        out[name] = {
            "sent": last["bytes_sent"] - first["bytes_sent"],
            "received": last["bytes_received"] - first["bytes_received"],
            "collectives": last["collectives"] - first["collectives"],
            "buckets": buckets[BYTES_STEPS - 1],
            "options": options,
        }
    return out


def _broadcast_counts(rank: int, world_size: int) -> dict:
    transport = gcomp.comm.Transport()
    traffic = gcomp.metrics.TrafficStats()
    tensor = torch.full((5,), float(rank), dtype=torch.float64)
    transport.broadcast_(tensor, world_size - 1, traffic)
    return {"value": tensor.tolist(), "sent": traffic.bytes_sent, "received": traffic.bytes_received}


def _two_rank_checks(rank: int, world_size: int, directory: str) -> dict:
    return {
        "full_density": _full_density(rank, ("ef14", "ef21", "econtrol")),
        "identical": _identical_parameters(rank),
        "non_finite": _non_finite(rank),
        "checkpoint": _checkpoint_run(rank, directory, SHARED),
        "bytes": _bytes(rank, world_size),
        "broadcast": _broadcast_counts(rank, world_size),
    }


def _four_rank_checks(rank: int, world_size: int) -> dict:
    return {
        "full_density": _full_density(rank, ("ef14", "ef21")),
        "bytes": _bytes(rank, world_size),
        "broadcast": _broadcast_counts(rank, world_size),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_two_rank_checks, 2, str(tmp_path_factory.mktemp("scalefree-checkpoints")), timeout=300)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_ranks(_four_rank_checks, 4, timeout=300)


def test_full_density_equals_plain_ddp_on_two_ranks(two_ranks):
    for result in two_ranks:
        for feedback, check in result["full_density"].items():
            assert check["settings"] == {"density=1"}, "every layer must really be sent sparse"
            assert check["compressed_steps"] == FULL_DENSITY_STEPS - 1 and check["layouts"] >= 4
            # EF14 sums the same float32 values DDP sums (halving is exact): bit for bit. EF21 and
            # EControl add the mean to a running estimate: equal up to float rounding.
            if feedback == "ef14":
                assert check["exact"], check
            assert check["error"] < 1e-5, (feedback, check)


def test_full_density_equals_plain_ddp_on_four_ranks(four_ranks):
    for result in four_ranks:
        for feedback, check in result["full_density"].items():
            assert check["settings"] == {"density=1"}
            assert check["error"] < 1e-5, (feedback, check)  # ring sums round differently from DDP's


def test_every_rank_holds_the_same_parameters(two_ranks):
    first, second = (result["identical"] for result in two_ranks)
    cases = [name for name in first if name != "estimates"]
    assert len(cases) == len(STATEFUL_FEEDBACKS) + 3
    for name in cases:
        assert first[name]["finite"] and second[name]["finite"], name
        for a, b in zip(first[name]["parameters"], second[name]["parameters"]):
            assert torch.equal(a, b), name
    assert len(first["estimates"]) >= 6 and first["estimates"].keys() == second["estimates"].keys()
    for layer in first["estimates"]:
        assert torch.equal(first["estimates"][layer], second["estimates"][layer]), layer


def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(two_ranks):
    for result in two_ranks:
        for feedback, check in result["non_finite"].items():
            assert not check["poisoned_step_finite"], feedback  # rank 0 too, not only rank 1
            assert check["state_unchanged"] and check["state_tensors"] >= 7, (feedback, check)
            assert check["later_steps_finite"], feedback
            assert check["skipped_steps"] == 1, feedback


def test_resume_is_bit_identical(two_ranks):
    for result in two_ranks:
        for feedback, check in result["checkpoint"].items():
            assert check["saved_exchange"] == "shared_indices"
            assert check["saved_tensors"] >= 8, (feedback, check)
            assert check["equal"], feedback


@pytest.mark.parametrize("world", [2, 4])
def test_broadcast_moves_and_counts_one_message(world, request):
    results = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    for rank, result in enumerate(results):
        check = result["broadcast"]
        assert check["value"] == [float(world - 1)] * 5
        root = rank == world - 1
        assert (check["sent"], check["received"]) == ((40, 0) if root else (0, 40))


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_equal_the_cost_model_and_shared_indices_do_not_grow(world, request):
    results = request.getfixturevalue("two_ranks" if world == 2 else "four_ranks")
    steps = BYTES_STEPS - BYTES_FIRST_SPARSE_STEP
    per_rank = {}
    for name in results[0]["bytes"]:
        checks = [result["bytes"][name] for result in results]
        buckets = checks[0]["buckets"]
        assert all(check["buckets"] == buckets for check in checks)
        collectives = topk_step_collectives(buckets, density=0.01, **checks[0]["options"])
        predicted = communication_cost(collectives, world, Link(1e9))
        # Summed over ranks: the broadcast's root changes every step (the mean over ranks is exact).
        assert sum(check["sent"] for check in checks) == round(steps * world * predicted.sent), name
        assert sum(check["received"] for check in checks) == round(steps * world * predicted.received), name
        assert all(check["collectives"] == steps * len(collectives) for check in checks), name
        per_rank[name] = sum(check["sent"] + check["received"] for check in checks) / world / steps
    # Shared indices carry a fraction of what the allgather does, already at 2 ranks.
    assert per_rank["shared_indices"] < per_rank["allgather"]
    assert per_rank["shared_indices-float16-values"] < per_rank["shared_indices"]


# ---------------------------------------------------------------------------------- cost model
def test_cost_model_scaling():
    buckets = [[256 * 256, 256, 256 * 256, 256, 8 * 256, 8]]
    link = Link(1.25e9, 20e-6)
    allgather = {w: topk_step_cost(buckets, w, link, density=0.01) for w in (2, 4, 8, 64)}
    shared = {w: topk_step_cost(buckets, w, link, density=0.01, exchange="shared_indices") for w in (2, 4, 8, 64)}
    # The allgather's received bytes grow as (W - 1); shared indices stay below one message.
    message = [c.nbytes for c in topk_step_collectives(buckets, density=0.01) if c.kind == "allgather"]
    assert len(message) == 1 and allgather[64].received - allgather[2].received == 62 * message[0]
    assert max(c.received + c.sent for c in shared.values()) < 1.1 * min(c.received + c.sent for c in shared.values())
    assert all(shared[w].seconds < allgather[w].seconds for w in (4, 8, 64))
    assert all(c.collectives == 2 for c in list(allgather.values()) + list(shared.values()))
    # A value dtype other than the model's costs a third collective.
    assert topk_step_cost(buckets, 4, link, exchange="shared_indices", value_dtype="float16").collectives == 3


def test_collective_formulas():
    link = Link(rate=1e6, latency=1e-3)
    ring = collective_cost(Collective("allreduce", 1000), 4, link)
    assert ring.wire_sent == pytest.approx(1500) and ring.seconds == pytest.approx(6e-3 + 1.5e-3)
    gather = collective_cost(Collective("allgather", 1000), 4, link)
    assert (gather.sent, gather.received) == (1000, 3000) and gather.seconds == pytest.approx(3 * 2e-3)
    tree = collective_cost(Collective("broadcast", 1000), 8, link)
    assert tree.sent == pytest.approx(125) and tree.received == pytest.approx(875) and tree.seconds == pytest.approx(3 * 2e-3)
    chain = collective_cost(Collective("broadcast", 1000), 8, link, "ring")
    assert chain.seconds == pytest.approx(7e-3 + 1e-3)
    alone = collective_cost(Collective("allgather", 1000), 1, link)
    assert (alone.sent, alone.received, alone.seconds) == (1000, 0, 0)
    with pytest.raises(ValueError, match="broadcast algorithm"):
        collective_cost(Collective("broadcast", 1), 2, link, "butterfly")
    with pytest.raises(ValueError, match="collective kind"):
        Collective("reduce", 1)
    with pytest.raises(ValueError, match="link rate"):
        Link(0.0)


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize("exchange, error", [("scalecom", ValueError), (None, TypeError), (2, TypeError)])
def test_invalid_exchange(exchange, error):
    with pytest.raises(error, match="exchange"):
        gcomp.TopKState(exchange=exchange)


def test_exchange_is_part_of_the_configuration():
    assert gcomp.TopKState().config()["exchange"] == "allgather"
    assert gcomp.TopKState(exchange="shared_indices").config()["exchange"] == "shared_indices"
    assert "exchange" not in gcomp.QuantizeState().config()  # quantization keeps its allgather


def test_shared_indices_need_a_codec_that_selects_indices():
    make_exchange("shared_indices").check_codec(gcomp.TopKState())
    with pytest.raises(ValueError, match="selects indices"):
        make_exchange("shared_indices").check_codec(gcomp.QuantizeState())


def test_leader_rotates_over_every_rank():
    assert [SharedIndicesExchange.leader(step, 3) for step in range(7)] == [0, 1, 2, 0, 1, 2, 0]


# ---------------------------------------------------------------------------------- devices
@pytest.fixture(scope="module")
def fake_process_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [
    {"density": 0.1, "feedback": "ef21", **SHARED},
    {"density": 0.1, "feedback": "ef14", "value_dtype": "float16", **SHARED},
    {"density": 0.1, "feedback": "econtrol", "adaptive": gcomp.AdaptiveConfig(every_steps=2, accumulate_steps=1), **SHARED},
], ids=["ef21", "ef14-float16-values", "econtrol-adaptive"])
def test_shared_indices_keep_every_tensor_on_the_bucket_device(fake_process_group, monkeypatch, options, dtype):
    """The whole hook path on fake CUDA gradients (see tests/test_device_placement.py): a CPU
    tensor meeting the bucket's fails. torch's ``broadcast`` asks the (absent) GPU for its compute
    capability before calling the process group: answered here, as the harness bridges ``copy_``."""
    from test_device_placement import _drive

    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, source, non_blocking=False: torch.ops.aten.copy_.default(self, source, non_blocking))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    state, runtime = _drive("topk", options, dtype)
    stats = state.stats()
    assert stats["compressed_steps"] == 4 and state.layer_state
    assert runtime.host_reads > 0


def test_gloo_broadcast_of_a_gpu_tensor_is_staged_through_the_cpu(fake_process_group, monkeypatch):
    """On gloo the index message of a CUDA bucket goes through host memory (as the allgather)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gcomp.comm.Transport, "backend", property(lambda self: "gloo"))
    monkeypatch.setattr(dist, "broadcast", lambda tensor, **kwargs: seen.append(tensor.device.type))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, source, non_blocking=False: torch.ops.aten.copy_.default(self, source, non_blocking))
    with FakeTensorMode():
        message = torch.zeros(16, dtype=torch.uint8, device="cuda")
        out = gcomp.comm.Transport().broadcast_(message, 0, None)
    assert seen == ["cpu"] and out.device.type == "cuda"
