"""The time-aware choice: the cost model on synthetic measurements, and decisions inside real DDP
runs on 2 gloo ranks (measurements injected, so every decision is deterministic)."""
import logging
import math
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.adaptive.cost import BucketCost, CostModel, LayerCost, MeasuredLink, choose_dense, fit_compute, fit_link
from gcomp.adaptive.timeaware import dense_bucket, describe_bucket
from gcomp.adaptive.timing import LocalMeasurements, combine
from distributed import run_ranks
from models import batch, make_mlp

# ----------------------------------------------------------------------------- the cost model


def _matrix(name: str, n: int, m: int, rank: int = 4) -> LayerCost:
    """A PowerSGD-like layer: dense n*m floats, compressed P (n r) then Q (m r)."""
    return LayerCost(name, n * m, n * m * 4, True, n * rank * 4, m * rank * 4)


def _bias(name: str, n: int) -> LayerCost:
    return LayerCost(name, n, n * 4)


BUCKETS = [
    BucketCost((_matrix("l3.weight", 1024, 1024), _bias("l3.bias", 1024))),
    BucketCost((_matrix("l2.weight", 1024, 1024), _bias("l2.bias", 1024))),
    BucketCost((_matrix("l1.weight", 1024, 512), _bias("l1.bias", 1024))),
]


def _model(rate: float, latency: float = 1e-4, per_element: float = 1e-9, window: float = 0.0, base: float = 0.01) -> CostModel:
    ready = tuple(window * i / (len(BUCKETS) - 1) for i in range(len(BUCKETS)))
    return CostModel(MeasuredLink(latency, rate, world=2), ready, base, per_element=per_element)


def test_slow_link_compresses_every_large_layer():
    model = _model(rate=12.5e6)  # 100 Mbit/s: a 4 MB layer takes 0.34 s, its factors 3 ms
    choice = choose_dense(model, BUCKETS)
    assert set(choice.compressed) == {"l1.weight", "l2.weight", "l3.weight"}
    assert choice.dense == {"l1.bias", "l2.bias", "l3.bias"}
    assert choice.step_seconds < 0.5 * choice.all_dense_seconds
    assert choice.step_seconds == pytest.approx(model.step_seconds(BUCKETS, choice.dense))


def test_infinitely_fast_link_stays_dense():
    choice = choose_dense(_model(rate=math.inf), BUCKETS)
    assert choice.compressed == ()
    assert choice.dense == {layer.name for bucket in BUCKETS for layer in bucket.layers}
    assert choice.step_seconds == choice.all_dense_seconds


def test_compute_above_the_saving_stays_dense():
    # 10 GB/s: a 4 MB layer needs 0.4 ms on the link; compressing it costs 1 ms of compute.
    slow_compute = _model(rate=10e9, per_element=1e-3 / 2**20)
    assert choose_dense(slow_compute, BUCKETS).compressed == ()
    # The same link with compute 100x cheaper: now compressing pays.
    fast_compute = _model(rate=10e9, per_element=1e-5 / 2**20)
    assert choose_dense(fast_compute, BUCKETS).compressed != ()


def test_communication_hidden_by_backward_stays_dense():
    # 1 GB/s: 4 ms per large layer, but backward goes on for another half second after each
    # bucket but the last: only the last bucket is exposed, so only its layer is worth compressing.
    model = _model(rate=1e9, window=1.0)
    choice = choose_dense(model, BUCKETS)
    assert choice.compressed == ("l1.weight",)
    assert choice.step_seconds < choice.all_dense_seconds


def test_tolerance_prefers_dense_when_the_gain_is_small():
    model = _model(rate=2e9, base=1.0)  # compressing saves about 3 ms of a 1 s step
    assert choose_dense(model, BUCKETS, tolerance=0.0).compressed != ()
    assert choose_dense(model, BUCKETS, tolerance=0.02).compressed == ()


def test_pipeline_exposure():
    model = CostModel(MeasuredLink(0.0, 1.0, 2), ready=(0.0, 1.0, 2.0), base=0.0)
    assert model.exposed([0.5, 0.5, 0.5]) == pytest.approx(0.5)  # each hidden but the last
    assert model.exposed([3.0, 0.5, 0.5]) == pytest.approx(2.0)  # 3.0 + 0.5 + 0.5 - 2.0
    assert model.exposed([0.0, 0.0, 0.0]) == 0.0


def test_fits_recover_synthetic_parameters():
    link = MeasuredLink(latency=2e-4, rate=5e7, world=4)
    jobs = [(nbytes, link.allreduce(nbytes)) for nbytes in (1e5, 1e6, 4e6)]
    fitted = fit_link(2e-4, jobs, world=4)
    assert fitted.rate == pytest.approx(5e7) and fitted.latency == 2e-4
    assert fit_link(1e-3, [(1e6, 5e-4)], world=2).rate == math.inf  # no slower than latency: free link
    buckets = [BucketCost(tuple(_matrix(f"b{b}.l{i}", 64 * (b + 1), 64) for i in range(b + 1))) for b in range(4)]
    truth = CostModel(link, (0.0,) * 4, 0.0, per_element=3e-9, per_layer=5e-5)
    measured = [(bucket, truth.bucket_seconds(bucket, frozenset())) for bucket in buckets]
    per_layer, per_element = fit_compute(link, measured)
    assert per_layer == pytest.approx(5e-5) and per_element == pytest.approx(3e-9)
    # One bucket cannot separate the terms: everything per element, the total matched.
    per_layer, per_element = fit_compute(link, measured[:1])
    layers, numel = buckets[0].compressed_work(frozenset())
    assert per_layer == 0.0 and per_element * numel == pytest.approx(5e-5 * layers + 3e-9 * numel)


def test_combine_takes_slowest_schedule_and_fastest_reductions():
    first = LocalMeasurements(1e-4, 0.2, [0.0, 0.5], [0.3, 0.4], {"topk": [0.1, 0.2]})
    second = LocalMeasurements(3e-4, 0.1, [0.0, 0.7], [0.2, 0.6], {"topk": [0.3, 0.1]})
    both = combine([first, second])
    assert both == LocalMeasurements(1e-4, 0.2, [0.0, 0.7], [0.2, 0.4], {"topk": [0.1, 0.1]})
    assert both == combine([second, first])
    vector = first.to_vector(["topk"])
    assert LocalMeasurements.from_vector(vector, 2, ["topk"]) == first


def test_describe_bucket_matches_the_hook_plans():
    from gcomp.hooks.layout import BucketLayout, LayerSlot

    layout = BucketLayout(length=64 * 32 + 64, dtype=torch.float32,
                          layers=(LayerSlot("w", 0, 64 * 32, (64, 32)), LayerSlot("b", 64 * 32, 64, (64,))))
    powersgd = describe_bucket(gcomp.PowerSGDState(rank=2), layout)
    assert [(l.name, l.compressible, l.first_bytes, l.second_bytes) for l in powersgd.layers] == [
        ("w", True, 64 * 2 * 4, 32 * 2 * 4), ("b", False, 0, 0)]
    # bfloat16 factors: half the factor bytes, P in an allreduce of its own (as the hook sends them).
    narrow = describe_bucket(gcomp.PowerSGDState(rank=2, factor_dtype="bfloat16"), layout)
    assert narrow.collectives(frozenset()) == [("allreduce", 64 * 4), ("allreduce", 64 * 2 * 2), ("allreduce", 32 * 2 * 2)]
    assert narrow.collectives({"w"}) == [("allreduce", (64 * 32 + 64) * 4)]
    only_matrix = BucketLayout(length=64 * 32, dtype=torch.float32, layers=(LayerSlot("w", 0, 64 * 32, (64, 32)),))
    assert describe_bucket(gcomp.PowerSGDState(rank=2, factor_dtype="bfloat16"), only_matrix).collectives(frozenset()) == [
        ("allreduce", 64 * 2 * 2), ("allreduce", 32 * 2 * 2)]  # no dense leftovers: no dense allreduce
    state = gcomp.TopKState(density=0.05)
    topk = describe_bucket(state, layout)
    plan = state._build_plan(layout)
    assert topk.second == "allgather"
    assert [(l.name, l.second_bytes) for l in topk.layers if l.compressible] == [
        (layer.slot.name, layer.message_bytes) for layer in plan.compressed]
    assert topk.collectives(frozenset())[1] == ("allgather", sum(layer.message_bytes for layer in plan.compressed))
    assert topk.collectives({"w", "b"}) == [("allreduce", (64 * 32 + 64 + 1) * 4)]  # dense + flag, no allgather
    assert dense_bucket(layout).collectives(frozenset()) == [("allreduce", (64 * 32 + 64) * 4)]


@pytest.mark.parametrize("arguments", [{"skip_steps": -1}, {"trial_steps": 1}, {"tolerance": -0.1}, {"probe_repeats": 0},
                                       {"tolerance": float("nan")}])
def test_invalid_config(arguments):
    with pytest.raises(ValueError):
        gcomp.TimeAwareConfig(**arguments)


def test_invalid_attachment():
    with pytest.raises(ValueError, match="warmup_steps must be >= "):
        gcomp.TimeAwareController(gcomp.QuantizeState(bits=4))  # quantize's default warm-up is 0
    with pytest.raises(TypeError, match="compressing method"):
        gcomp.TimeAwareController(gcomp.AllreduceState(warmup_steps=5))
    with pytest.raises(ValueError, match="already has"):
        gcomp.TimeAwareController(gcomp.AutoState())
    with pytest.raises(ValueError, match="candidates"):
        gcomp.AutoState(candidates=("allreduce", "nope"))
    with pytest.raises(ValueError, match="may not set"):
        gcomp.AutoState(topk_options={"warmup_steps": 3})


# ----------------------------------------------------------------------------- inside DDP

WARMUP = 4
SLOW = {"latency": 1e-4, "rate": 1e5}  # 100 kB/s: every large layer worth compressing
FAST = {"latency": 1e-5, "rate": math.inf}


def synthetic(link: dict, window: float = 0.0, base: float = 0.05, trial: float = 1e-4):
    """Measurements of a link ``link`` for whatever buckets the decision step has."""

    def measurements(layouts):
        model = MeasuredLink(link["latency"], link["rate"], 2)
        buckets = len(layouts)
        return LocalMeasurements(
            latency=link["latency"], base=base,
            ready=[window * i / max(1, buckets - 1) for i in range(buckets)],
            dense_jobs=[model.allreduce(layout.length * 4) for layout in layouts],
            trial_jobs={method: [trial] * buckets for method in ("powersgd", "topk", "quantize")},
        )

    return measurements


def _skewed_batch(rank: int, step: int):
    x, y = batch(rank, step, inputs=16)
    return x * (1.0 + 3.0 * rank), y * (1.0 - 0.5 * rank)


def _run(rank, method, options, steps, measurements=None, *, split=None, directory=None, bucket_cap_mb=0.02):
    """Train the MLP; optionally checkpoint at ``split`` and continue in a fresh DDP/state."""

    def build():
        torch.manual_seed(0)
        ddp = DistributedDataParallel(make_mlp(width=64, depth=5), bucket_cap_mb=bucket_cap_mb)
        state = gcomp.register(ddp, method, **options) if method else None
        if measurements is not None:
            state.time_controller.inject(measurements)
        return ddp, state, torch.optim.SGD(ddp.parameters(), lr=0.01)

    ddp, state, optimizer = build()
    gradients = []
    for step in range(steps):
        if split is not None and step == split:
            path = os.path.join(directory, f"rank{rank}-{method}.pt")
            torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
            state.close()
            saved = torch.load(path, weights_only=True)
            ddp, state, optimizer = build()
            ddp.module.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state.load_state_dict(saved["gcomp"])
        x, y = _skewed_batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
        optimizer.step()
    result = {"params": [p.detach().clone() for p in ddp.parameters()], "gradients": gradients}
    if state is not None:
        state.synchronize()
        stats = state.stats()
        result.update(decision=stats["time_aware"]["decision"], stats=stats,
                      active=getattr(state, "active", None), dense_layers=sorted(state.dense_layers))
        state.close()
    return result


AUTO = {"warmup_steps": WARMUP, "rank": 2, "density": 0.05}


def _agreement_runs(rank, world_size):
    logging.basicConfig(level=logging.INFO)
    # Rank 0 measured a slow link, rank 1 an infinitely fast one: the fastest reductions win
    # (rank 0 waited inside the collectives), so both decide for the fast link, i.e. dense.
    mixed = _run(rank, "auto", AUTO, 14, synthetic(SLOW if rank == 0 else FAST))
    slow = _run(rank, "auto", AUTO, 14, synthetic(SLOW, base=0.01 * (rank + 1)))
    topk = _run(rank, "topk", {"density": 0.05, "warmup_steps": WARMUP, "time_aware": True}, 10,
                synthetic(SLOW, base=0.05 * (rank + 1)))
    return {"mixed": mixed, "slow": slow, "topk": topk}


def test_ranks_with_different_measurements_decide_alike():
    first, second = run_ranks(_agreement_runs, 2, timeout=240)
    for name in ("mixed", "slow", "topk"):
        assert first[name]["decision"] == second[name]["decision"], name
        assert first[name]["decision"]["step"] == (WARMUP + 2 * 3 - 1 if name != "topk" else WARMUP + 3 - 1)
        for one, other in zip(first[name]["params"], second[name]["params"]):
            assert torch.equal(one, other), name  # replicas stay in sync
    assert first["mixed"]["decision"]["choice"] == "allreduce" and first["mixed"]["active"] == "allreduce"
    # Dense chosen at step D: from step D + 2 on, DDP's own allreduce (14 steps in all).
    assert first["mixed"]["stats"]["model_group_steps"] == 14 - (first["mixed"]["decision"]["step"] + 2)
    assert first["slow"]["stats"]["model_group_steps"] == 0
    assert first["mixed"]["decision"]["link"]["rate_bytes_per_s"] is None
    slow = first["slow"]["decision"]
    assert slow["choice"] in ("powersgd", "topk") and first["slow"]["active"] == slow["choice"]
    assert slow["compressed_layers"], "a slow link compresses the large layers"
    assert slow["base_step_s"] == pytest.approx(0.02)  # the slowest rank's step
    assert slow["link"]["rate_bytes_per_s"] == pytest.approx(1e5)
    # Single method: what top-k can compress is compressed; the traffic report agrees.
    topk = first["topk"]
    layers = topk["stats"]["layers"]
    assert topk["decision"]["choice"] == "topk"
    assert len(topk["decision"]["compressed_layers"]) >= 4  # the 64x64 and 64x16 weights at least
    for name, layer in topk["decision"]["layers"].items():
        # Compute is free here and the link slow: every large layer top-k can compress is compressed
        # (a small one may stay dense: its saving is within the tolerance).
        if layer["compressed_s"] is None:
            assert layer["setting"] == "dense", name
        elif layers[name]["numel"] >= 1024:
            assert layer["setting"] == "compressed", name
        assert layers[name]["setting"] == ("density=0.05" if layer["setting"] == "compressed" else "dense"), name


def _fast_single_method(rank, world_size):
    out = {}
    for method, options in (("topk", {"density": 0.05}), ("powersgd", {"rank": 2})):
        ran = _run(rank, method, {**options, "warmup_steps": WARMUP, "time_aware": True}, 10, synthetic(FAST))
        out[method] = {"decision": ran["decision"], "dense_layers": ran["dense_layers"], "settings": {
            name: layer["setting"] for name, layer in ran["stats"]["layers"].items()}}
    return out


def test_fast_link_sends_every_layer_dense():
    for result in run_ranks(_fast_single_method, 2, timeout=180):
        for method, ran in result.items():
            assert ran["decision"]["compressed_layers"] == [], method
            assert len(ran["dense_layers"]) == 10, method  # 5 weights + 5 biases
            assert set(ran["settings"].values()) == {"dense"}, method  # after the decision, nothing compressed


def _resume(rank, world_size, directory):
    out = {}
    for name, split in (("after", 12), ("trial", 6), ("warmup", 3)):
        whole = _run(rank, "auto", AUTO, 16, synthetic(SLOW))
        resumed = _run(rank, "auto", AUTO, 16, synthetic(SLOW), split=split, directory=directory)
        out[name] = {
            "equal": all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"])),
            "same_decision": whole["decision"] == resumed["decision"],
            "choice": resumed["decision"]["choice"],
        }
    topk = {"density": 0.05, "warmup_steps": WARMUP, "time_aware": True}
    whole = _run(rank, "topk", topk, 12, synthetic(SLOW))
    resumed = _run(rank, "topk", topk, 12, synthetic(SLOW), split=9, directory=directory)
    out["topk"] = {"equal": all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"])),
                   "same_decision": whole["decision"] == resumed["decision"], "choice": "topk",
                   "dense": whole["dense_layers"] == resumed["dense_layers"] != []}
    return out


def test_resume_is_bit_identical(tmp_path):
    for result in run_ranks(_resume, 2, str(tmp_path), timeout=300):
        for name, checks in result.items():
            assert checks.pop("equal") and checks.pop("same_decision"), (name, checks)
            assert checks["choice"] != "allreduce", (name, checks)
            assert checks.get("dense", True), (name, checks)


def _auto_vs_ddp(rank, world_size):
    reference = _run(rank, None, {}, 14, bucket_cap_mb=0.004)
    # Full rank and density 1: every candidate sends every layer dense.
    options = {"warmup_steps": WARMUP, "rank": 64, "density": 1.0}
    measured = {"slow": synthetic(SLOW), "fast": synthetic(FAST)}
    out = {}
    for name, measurements in measured.items():
        auto = _run(rank, "auto", options, 14, measurements, bucket_cap_mb=0.004)
        out[name] = {
            "error": max(float((a - b).norm() / b.norm()) for a, b in zip(auto["gradients"], reference["gradients"])),
            "compressed_steps": auto["stats"]["compressed_steps"],
            "choice": auto["decision"]["choice"],
        }
    return out


def test_auto_at_full_rank_and_density_one_is_ddp():
    for result in run_ranks(_auto_vs_ddp, 2, timeout=240):
        for name, checks in result.items():
            assert checks["error"] < 1e-6, (name, checks)
            assert checks["compressed_steps"] == 14 - WARMUP, (name, checks)
            assert checks["choice"] == "allreduce", (name, checks)  # nothing compressible: dense is never slower


def _mismatch(rank, world_size, first, second):
    method, options = first if rank == 0 else second
    try:
        _run(rank, method, options, 2)
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("second", [
    ("powersgd", {"warmup_steps": WARMUP, "rank": 2}),
    ("topk", {"warmup_steps": WARMUP, "density": 0.05, "time_aware": True}),
])
def test_auto_on_one_rank_only_raises_on_every_rank(second):
    results = run_ranks(_mismatch, 2, ("auto", AUTO), second, timeout=120)
    for result in results:
        assert "ranks disagree on the compression configuration" in result, results


def test_time_aware_on_one_rank_only_raises_on_every_rank():
    plain = ("topk", {"warmup_steps": WARMUP, "density": 0.05})
    aware = ("topk", {"warmup_steps": WARMUP, "density": 0.05, "time_aware": True})
    results = run_ranks(_mismatch, 2, aware, plain, timeout=120)
    for result in results:
        assert "ranks disagree on the compression configuration" in result, results
