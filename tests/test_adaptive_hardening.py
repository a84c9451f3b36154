"""The adaptive controller under faults on one rank only: never a hang, never diverging settings."""
import logging
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from models import batch, make_mlp


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


def _faulty_rank(rank: int, world_size: int, fault: str) -> dict:
    records = _Records()
    logging.getLogger("gcomp").addHandler(records)
    logging.getLogger("gcomp").setLevel(logging.INFO)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(width=64, depth=5), bucket_cap_mb=0.02)
    config = gcomp.AdaptiveConfig(every_steps=6, accumulate_steps=3)
    state = gcomp.register(ddp, "powersgd", rank=4, warmup_steps=2, min_compression_rate=1.5, adaptive=config)
    target = dict(ddp.module.named_parameters())["2.weight"]
    if fault == "svd" and rank == 1:
        original = state.controller.family.errors

        def failing(tensor, shape, settings):
            if tuple(shape) == tuple(target.shape) and tensor.numel() == target.numel():
                raise torch.linalg.LinAlgError("the SVD did not converge (injected)")
            return original(tensor, shape, settings)

        state.controller.family.errors = failing
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step in range(14):
        handle = None
        if fault == "nan" and rank == 1 and step == 6:  # compressed step 5: in the window before the decision at 6
            handle = target.register_hook(lambda gradient: gradient * float("nan"))
        x, y = batch(rank, step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        if handle is not None:
            handle.remove()
        if all(torch.isfinite(p.grad).all() for p in ddp.parameters()):
            optimizer.step()
    state.synchronize()  # a decision may still be running behind the last step
    result = {
        "history": [(r["step"], r["choices"], r["used_fallback"]) for r in state.controller.history],
        "settings": dict(state.layer_ranks),
        "params": [p.detach().clone() for p in ddp.parameters()],
        "skipped": state.stats()["skipped_steps"],
        "messages": records.messages,
    }
    state.close()
    return result


def _check_agreeing(results: list[dict]) -> None:
    first, second = results
    assert first["history"] == second["history"] and len(first["history"]) >= 2, first["history"]
    assert first["settings"] == second["settings"]
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_nan_on_one_rank_in_the_profiled_window():
    results = run_ranks(_faulty_rank, 2, "nan", timeout=120)
    _check_agreeing(results)
    assert results[0]["skipped"] == results[1]["skipped"] == 1
    warnings = [m for m in results[1]["messages"] if m.startswith("WARNING") and "2.weight" in m]
    assert warnings, results[1]["messages"]


def test_failed_error_measurement_on_one_rank_keeps_the_previous_choice():
    results = run_ranks(_faulty_rank, 2, "svd", timeout=120)
    _check_agreeing(results)
    first_decision = results[0]["history"][0]
    assert first_decision[2] is True, first_decision  # the fallback: the choice before (uniform)
    assert all(rank == 4 for rank in first_decision[1].values()), first_decision
    assert any("2.weight" in m and "could not measure" in m for m in results[1]["messages"]), results[1]["messages"]
    assert any("non-finite compression errors" in m for m in results[0]["messages"]), results[0]["messages"]


def _schedule(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    out = {}
    for label, config in (
        ("every", gcomp.AdaptiveConfig(every_steps=6, accumulate_steps=3)),
        ("on_request", gcomp.AdaptiveConfig(every_steps=None, accumulate_steps=2)),
    ):
        ddp = DistributedDataParallel(make_mlp(width=64, depth=5), bucket_cap_mb=0.02)
        state = gcomp.register(ddp, "powersgd", rank=4, warmup_steps=2, min_compression_rate=1.5, adaptive=config)
        for step in range(14):
            x, y = batch(rank, step)
            ddp.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
        if config.every_steps is None:
            state.controller.epoch_end()
        state.synchronize()  # a decision may still be running behind the last step
        out[label] = [(r["step"], r["compressed_step"], r["observed_steps"]) for r in state.controller.history]
        state.close()
    return out


def test_schedule_counts_compressed_steps_and_window_sizes():
    for result in run_ranks(_schedule, 2, timeout=120):
        # Warm-up steps (2) are not counted: decisions after compressed steps 6 and 12.
        assert result["every"] == [(8, 6, 3), (14, 12, 3)], result["every"]
        # On request, only the first accumulate_steps compressed steps after the last decision.
        assert result["on_request"] == [(14, 12, 2)], result["on_request"]


def _slow_decision(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    ddp = DistributedDataParallel(make_mlp(width=64, depth=5), bucket_cap_mb=0.02)
    state = gcomp.register(ddp, "powersgd", rank=4, warmup_steps=1, min_compression_rate=1.5,
                           adaptive=gcomp.AdaptiveConfig(every_steps=2, accumulate_steps=1))
    original = state.controller.family.errors
    delay = 0.25  # per profiled layer: a decision takes over a second

    def slow(tensor, shape, settings):
        time.sleep(delay)
        return original(tensor, shape, settings)

    state.controller.family.errors = slow
    backward_seconds = []
    for step in range(3):  # step 2 (compressed step 2) triggers the decision
        x, y = batch(rank, step)
        ddp.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        started = time.perf_counter()
        loss.backward()
        backward_seconds.append(time.perf_counter() - started)
    decisions_right_after = state.controller.decisions
    started = time.perf_counter()
    state.synchronize()
    waited = time.perf_counter() - started
    profiled = len(state.controller.history[0]["error_seconds"]) if state.controller.history else 0
    result = {
        "backward": backward_seconds, "waited": waited, "decisions_right_after": decisions_right_after,
        "decisions": state.controller.decisions, "profiled": profiled, "decide_seconds": state.stats()["seconds"]["decide"],
    }
    state.close()
    return result


def test_decision_runs_behind_the_step_not_inside_it():
    """The decision is queued after the step's last bucket: backward returns while the controller
    is still measuring errors, and synchronize() (state_dict, stats) waits for it."""
    for result in run_ranks(_slow_decision, 2, timeout=120):
        decision_seconds = 0.25 * result["profiled"]
        assert result["profiled"] >= 4 and result["decisions"] == 1, result
        assert result["decide_seconds"] >= decision_seconds, result
        assert max(result["backward"]) < decision_seconds / 2, result  # not waited for by backward
        assert result["decisions_right_after"] == 0 and result["waited"] > decision_seconds / 2, result
