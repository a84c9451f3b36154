"""Save every rank's state, rebuild DDP from scratch, load, continue: identical to no interruption."""
import os

import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from models import batch, make_mlp

TOTAL, SPLIT = 14, 7
OPTIONS = {"rank": 2, "warmup_steps": 3}


def _build(bucket_cap_mb: float, method: str = "powersgd"):
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=bucket_cap_mb)
    state = gcomp.register(ddp, method, **(OPTIONS if method == "powersgd" else {}))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, state, optimizer


def _train(ddp, optimizer, rank: int, steps: range) -> list[torch.Tensor]:
    losses = []
    for step in steps:
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _checkpoint_run(rank: int, world_size: int, directory: str, bucket_cap_mb: float) -> dict:
    ddp, state, optimizer = _build(bucket_cap_mb)
    _train(ddp, optimizer, rank, range(TOTAL))
    uninterrupted = [p.detach().clone() for p in ddp.parameters()]
    state.close()

    ddp, state, optimizer = _build(bucket_cap_mb)
    _train(ddp, optimizer, rank, range(SPLIT))
    path = os.path.join(directory, f"rank{rank}.pt")
    torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
    state.close()
    del ddp, state, optimizer

    checkpoint = torch.load(path, weights_only=True)
    ddp = DistributedDataParallel(make_mlp(depth=5, seed=123), bucket_cap_mb=bucket_cap_mb)
    ddp.module.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer"])
    state = gcomp.PowerSGDState(**OPTIONS)
    state.load_state_dict(checkpoint["gcomp"])
    state.attach(ddp)
    ddp.register_comm_hook(state, gcomp.powersgd_hook)
    _train(ddp, optimizer, rank, range(SPLIT, TOTAL))
    resumed = [p.detach().clone() for p in ddp.parameters()]
    stats = state.stats()
    state.close()
    return {
        "equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
        "difference": max(float((a - b).abs().max()) for a, b in zip(uninterrupted, resumed)),
        "steps": stats["steps"],
        "layers_with_residual": int(sum("error" in t for t in checkpoint["gcomp"]["layers"].values())),
    }


def test_resume_is_identical(tmp_path):
    for bucket_cap_mb in (25.0, 0.004):
        for result in run_ranks(_checkpoint_run, 2, str(tmp_path), bucket_cap_mb):
            assert result["layers_with_residual"] >= 4
            assert result["steps"] == TOTAL
            assert result["equal"], (bucket_cap_mb, result["difference"])


def _save_two_rank_state(rank: int, world_size: int, directory: str) -> None:
    ddp, state, optimizer = _build(25.0)
    _train(ddp, optimizer, rank, range(SPLIT))
    torch.save(state.state_dict(), os.path.join(directory, f"state{rank}.pt"))
    state.close()


def _load_elsewhere(rank: int, world_size: int, directory: str) -> dict:
    import warnings

    saved = torch.load(os.path.join(directory, "state0.pt"), weights_only=True)
    out = {}
    # Another world size: replicated Q kept, per-rank error buffers reset, with a warning.
    state = gcomp.PowerSGDState(**OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.load_state_dict(saved)
    out["world_warning"] = any("world size" in str(w.message) for w in caught)
    out["kept"] = sorted({key for tensors in state.layer_state.values() for key in tensors})
    state.close()
    # Another rank setting: warning; the stale Q no longer fits and is re-drawn on use, training runs.
    ddp = DistributedDataParallel(make_mlp(depth=5), bucket_cap_mb=25.0)
    state = gcomp.PowerSGDState(rank=3, warmup_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.load_state_dict(saved)
    out["config_warning"] = any("differ" in str(w.message) for w in caught)
    state.attach(ddp)
    ddp.register_comm_hook(state, gcomp.powersgd_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = _train(ddp, optimizer, rank, range(3))
    out["finite"] = all(bool(torch.isfinite(loss)) for loss in losses)
    out["q_shapes"] = sorted({tuple(t["q"].shape[1:]) for t in state.layer_state.values() if "q" in t})
    state.close()
    # Another method: refused.
    try:
        gcomp.TopKState().load_state_dict(saved)
        out["method_error"] = None
    except ValueError as error:
        out["method_error"] = str(error)
    return out


def _baseline_resume(rank: int, world_size: int, directory: str) -> dict:
    """The stateless methods resume too (their counters and byte statistics included)."""
    out = {}
    for method in ("allreduce", "fp16", "bf16"):
        ddp, state, optimizer = _build(0.004, method)
        _train(ddp, optimizer, rank, range(TOTAL))
        uninterrupted, stats = [p.detach().clone() for p in ddp.parameters()], state.stats()
        state.close()
        ddp, state, optimizer = _build(0.004, method)
        _train(ddp, optimizer, rank, range(SPLIT))
        path = os.path.join(directory, f"{method}{rank}.pt")
        torch.save({"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}, path)
        state.close()
        checkpoint = torch.load(path, weights_only=True)
        ddp, state, optimizer = _build(0.004, method)
        ddp.module.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(checkpoint["gcomp"])
        _train(ddp, optimizer, rank, range(SPLIT, TOTAL))
        resumed = [p.detach().clone() for p in ddp.parameters()]
        out[method] = all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)) and state.stats()["bytes_sent"] == stats["bytes_sent"]
        state.close()
    return out


def test_stateless_methods_resume_identically(tmp_path):
    for result in run_ranks(_baseline_resume, 2, str(tmp_path)):
        assert all(result.values()), result


def test_mismatched_checkpoints_follow_the_policy(tmp_path):
    run_ranks(_save_two_rank_state, 2, str(tmp_path))
    [result] = run_ranks(_load_elsewhere, 1, str(tmp_path))
    assert result["world_warning"] and result["kept"] == ["q"]
    assert result["config_warning"] and result["finite"] and result["q_shapes"] == [(3,)]
    assert result["method_error"] and "powersgd" in result["method_error"]
