"""The hierarchical path (dense inside a node, compressed among node leaders) on 4 gloo ranks that
declare themselves 2 nodes x 2 processes, the way torchrun tells them (``GROUP_RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), and its fallback to the flat path.

Spawning 4 ranks costs seconds on this machine, so each spawn runs many checks and the tests
assert on their share of the results (module-scoped fixtures).
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Optional

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import gcomp
from distributed import run_ranks
from gcomp.comm.topology import Placement, Topology, plan_topology
from models import batch, make_mlp, max_relative_error, train_steps

WORLD = 4
SMALL_BUCKETS_MB = 0.004  # about one 32x32 layer per bucket: many buckets, ordering matters
EXACT_STEPS = 5
TOTAL, SPLIT = 10, 5  # checkpoint: steps in all, steps before the save
POISON_STEP = 4

# Settings under which every codec sends everything exactly (compression off in the math, not in
# the code path: the messages are real P/Q factors, sparse messages, quantized messages).
EXACT = {
    "powersgd": {"rank": 32, "min_compression_rate": 0.1, "warmup_steps": 1},
    "topk": {"density": 1.0, "feedback": "ef14", "min_compression_rate": 0.5, "warmup_steps": 1},
    "quantize": {"bits": 32, "min_compression_rate": 0.5},
}
COMPRESSING = {
    "powersgd": {"rank": 2, "warmup_steps": 2},
    "topk": {"density": 0.1, "feedback": "ef21", "warmup_steps": 2, "min_compression_rate": 0.5},
    "quantize": {"bits": 4, "chunk": 64, "min_compression_rate": 1.5},
}


def two_by_two(rank: int) -> dict[str, str]:
    """torchrun's variables for 2 nodes x 2 processes, node-major (ranks 0, 1 on node 0)."""
    return {"GROUP_RANK": str(rank // 2), "LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2"}


def interleaved(rank: int) -> dict[str, str]:
    """2 x 2 with ranks 0, 2 on node 0 and 1, 3 on node 1: membership comes from the gathered rows."""
    return {"GROUP_RANK": str(rank % 2), "LOCAL_RANK": str(rank // 2), "LOCAL_WORLD_SIZE": "2"}


def one_per_node(rank: int) -> dict[str, str]:
    return {"GROUP_RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def one_node(rank: int) -> dict[str, str]:
    return {"GROUP_RANK": "0", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD)}


def _set_env(variables: dict[str, str]) -> None:
    for key in ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    os.environ.update(variables)


def _train(rank: int, method: str, options: dict, steps: int, *, poison_step: int = -1, poison_rank: int = 3,
           resume_from: Optional[dict] = None, start: int = 0, save_at: Optional[int] = None) -> dict:
    """Train ``make_mlp()`` with ``method``; optionally poison one rank's first-layer gradient with
    NaN at ``poison_step`` (the optimizer skips non-finite steps, as GradScaler does), start from
    a checkpoint, or save one after ``save_at`` steps."""
    model = make_mlp()
    ddp = DistributedDataParallel(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, method, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        state.load_state_dict(resume_from["gcomp"])
    out: dict[str, Any] = {"gradients": [], "skipped": []}
    for step in range(start, steps):
        x, y = batch(rank, step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        handle = None
        if step == poison_step:
            out["layers_before_poison"] = state.state_dict()["layers"]
            if rank == poison_rank:
                handle = model[0].weight.register_hook(lambda grad: grad * math.nan)
        loss.backward()
        if handle is not None:
            handle.remove()
        gradient = torch.cat([p.grad.flatten() for p in ddp.parameters()])
        out["gradients"].append(gradient.clone())
        if step == poison_step:
            out["layers_after_poison"] = state.state_dict()["layers"]
            out["poisoned_gradient_finite"] = bool(torch.isfinite(gradient).all())
        if bool(torch.isfinite(gradient).all()):
            optimizer.step()
        if save_at is not None and step + 1 == save_at:
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gcomp": state.state_dict()}
            out["checkpoint"] = copy.deepcopy(checkpoint)  # training goes on in place
    out["parameters"] = [p.detach().clone() for p in ddp.parameters()]
    out["stats"] = state.stats()
    out["layers"] = state.state_dict()["layers"]
    state.close()
    return out


def _same_layers(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[name].keys() == b[name].keys() and all(torch.equal(a[name][key], b[name][key]) for key in a[name]) for name in a
    )


# ---------------------------------------------------------------------------------------- spawns
def _main_checks(rank: int, world_size: int) -> dict:
    _set_env(two_by_two(rank))
    out: dict[str, Any] = {}
    reference = train_steps(rank, None, {}, EXACT_STEPS, SMALL_BUCKETS_MB)
    for method, options in EXACT.items():
        if method == "quantize":
            _set_env(interleaved(rank))
        got = _train(rank, method, options, EXACT_STEPS)
        _set_env(two_by_two(rank))
        out[f"exact/{method}"] = {
            "error": max_relative_error(got["gradients"], reference["gradients"]),
            "compressed_steps": got["stats"]["compressed_steps"],
            "settings": {layer["setting"] for layer in got["stats"]["layers"].values()},
            "topology": got["stats"]["topology"],
            "links": got["stats"]["links"],
            "bytes_sent": got["stats"]["bytes_sent"],
        }
    for method, options in COMPRESSING.items():
        run = _train(rank, method, options, TOTAL, save_at=SPLIT)
        resumed = _train(rank, method, options, TOTAL, resume_from=run["checkpoint"], start=SPLIT)
        out[f"compressing/{method}"] = {
            "parameters": run["parameters"],
            "resumed_identical": all(torch.equal(a, b) for a, b in zip(run["parameters"], resumed["parameters"]))
            and all(torch.equal(a, b) for a, b in zip(run["gradients"][SPLIT:], resumed["gradients"])),
            "layer_names": sorted(run["layers"]),
            "compressed_steps": run["stats"]["compressed_steps"],
            "compression_ratio": run["stats"]["compression_ratio"],
            "links": run["stats"]["links"],
        }
        poisoned = _train(rank, method, options, TOTAL, poison_step=POISON_STEP)
        out[f"poisoned/{method}"] = {
            "skipped_steps": poisoned["stats"]["skipped_steps"],
            "finite": poisoned["poisoned_gradient_finite"],
            "state_untouched": _same_layers(poisoned["layers_before_poison"], poisoned["layers_after_poison"]),
            "parameters": poisoned["parameters"],
        }
    return out


def _step_once(rank: int, method: str, options: dict, before: Optional[Callable[[gcomp.HookState], None]] = None) -> str:
    """One training step; the text of the error it raised ('' if none)."""
    ddp = DistributedDataParallel(make_mlp(), bucket_cap_mb=SMALL_BUCKETS_MB)
    state = gcomp.register(ddp, method, **options)
    if before is not None:
        before(state)
    try:
        x, y = batch(rank, 0)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        return ""
    except Exception as error:  # noqa: BLE001 - the test compares the texts
        return f"{type(error).__name__}: {error}"
    finally:
        state.close()


def _mismatch_checks(rank: int, world_size: int) -> dict:
    _set_env(two_by_two(rank))
    out = {}
    out["option"] = _step_once(rank, "powersgd", {"rank": 2, "warmup_steps": 0, "hierarchical": False if rank == 3 else "auto"})
    out["config"] = _step_once(rank, "powersgd", {"rank": 3 if rank == 1 else 2, "warmup_steps": 0})
    # State only the leader of node 0 holds (a checkpoint of another run loaded there alone): the
    # leaders disagree on which layers start their EF21 estimates this step; their agreement check
    # raises among the leaders, and the leaders pass the error on to their nodes.
    options = {"density": 0.1, "feedback": "ef21", "warmup_steps": 0, "min_compression_rate": 0.5}
    saved = _train(rank, "topk", options, 2)["layers"]  # DDP needs every rank; only rank 0 keeps it

    def load_on_rank0(state: gcomp.HookState) -> None:
        if rank == 0:
            state.store.load_state_dict(saved, keep_per_rank=True)

    out["leader_state"] = _step_once(rank, "topk", options, load_on_rank0)
    _set_env(one_per_node(rank))
    out["forced_on_uniform"] = _step_once(rank, "topk", {**options, "hierarchical": True})
    return out


def _fallback_checks(rank: int, world_size: int) -> dict:
    out = {}
    reference = train_steps(rank, None, {}, 3, SMALL_BUCKETS_MB)
    cases = {"one_per_node": one_per_node, "one_node": one_node, "unknown": lambda rank: {}, "hierarchical_false": two_by_two}
    for name, environment in cases.items():
        _set_env(environment(rank))
        options = {**EXACT["topk"], "hierarchical": False} if name == "hierarchical_false" else EXACT["topk"]
        got = _train(rank, "topk", options, 3)
        out[name] = {
            "topology": got["stats"]["topology"],
            "links": sorted(got["stats"]["links"]),
            "error": max_relative_error(got["gradients"], reference["gradients"]),
        }
    return out


@pytest.fixture(scope="module")
def main_results() -> list[dict]:
    return run_ranks(_main_checks, WORLD, timeout=400)


@pytest.fixture(scope="module")
def mismatch_results() -> list[dict]:
    return run_ranks(_mismatch_checks, WORLD, timeout=200)


@pytest.fixture(scope="module")
def fallback_results() -> list[dict]:
    return run_ranks(_fallback_checks, WORLD, timeout=200)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", sorted(EXACT))
def test_exact_settings_equal_plain_ddp(main_results: list[dict], method: str) -> None:
    for rank, result in enumerate(main_results):
        got = result[f"exact/{method}"]
        # Summation order differs from DDP's (node sums first), so equal up to rounding.
        assert got["error"] < 1e-5, (rank, got["error"])
        assert got["compressed_steps"] == EXACT_STEPS - EXACT[method].get("warmup_steps", 0)
        assert got["topology"]["path"] == "hierarchical"
        assert (got["topology"]["nodes"], got["topology"]["processes_per_node"]) == (2, 2)


def test_codec_runs_compressed_on_leaders_only(main_results: list[dict]) -> None:
    leaders = {"powersgd": (0, 2), "topk": (0, 2), "quantize": (0, 1)}  # quantize ran with interleaved nodes
    for method, leader_ranks in leaders.items():
        for rank, result in enumerate(main_results):
            got = result[f"exact/{method}"]
            assert got["topology"]["leader"] == (rank in leader_ranks)
            assert set(got["links"]) == ({"intra_node", "inter_node"} if rank in leader_ranks else {"intra_node"})
            if rank in leader_ranks:
                assert any(s.startswith(("rank=", "density=", "bits=")) for s in got["settings"]), got["settings"]
                assert got["links"]["inter_node"]["bytes_sent"] > 0
            else:
                assert got["settings"] == set()  # the codec never ran here
            # Per-link counters add up to the totals.
            assert sum(link["bytes_sent"] for link in got["links"].values()) == got["bytes_sent"]


@pytest.mark.parametrize("method", sorted(COMPRESSING))
def test_every_rank_holds_the_same_parameters(main_results: list[dict], method: str) -> None:
    for key in (f"compressing/{method}", f"poisoned/{method}"):
        first = main_results[0][key]["parameters"]
        for result in main_results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(first, result[key]["parameters"])), key


@pytest.mark.parametrize("method", sorted(COMPRESSING))
def test_resume_is_bit_identical_and_state_lives_on_leaders(main_results: list[dict], method: str) -> None:
    for rank, result in enumerate(main_results):
        got = result[f"compressing/{method}"]
        assert got["resumed_identical"], rank
        assert got["compressed_steps"] == TOTAL - COMPRESSING[method].get("warmup_steps", 0)
        if rank in (0, 2):
            assert got["layer_names"], "a leader keeps the codec's state"
            # What crossed the slow link is compressed: fewer bytes than one dense exchange per step.
            assert got["links"]["inter_node"]["bytes_sent"] < got["links"]["intra_node"]["bytes_sent"]
        else:
            assert got["layer_names"] == [], "a non-leader keeps no codec state"
    # Both leaders' replicated state and decisions agree: the same layers hold state.
    assert main_results[0][f"compressing/{method}"]["layer_names"] == main_results[2][f"compressing/{method}"]["layer_names"]


@pytest.mark.parametrize("method", sorted(COMPRESSING))
def test_non_finite_on_one_rank_skips_the_step_everywhere(main_results: list[dict], method: str) -> None:
    for rank, result in enumerate(main_results):
        got = result[f"poisoned/{method}"]
        assert got["skipped_steps"] == 1, (rank, got["skipped_steps"])
        assert not got["finite"], rank  # GradScaler sees a non-finite bucket on every rank
        assert got["state_untouched"], rank


def test_disagreements_raise_on_every_rank(mismatch_results: list[dict]) -> None:
    for key, pattern in (("option", "hierarchical option"), ("config", "compression configuration"),
                         ("leader_state", "ranks disagree on the top-k layers"), ("forced_on_uniform", "hierarchical=True")):
        texts = [result[key] for result in mismatch_results]
        # An error on the communication thread reaches the user through DDP's future, which
        # rewraps it as a RuntimeError with the same text.
        assert all(pattern in text for text in texts), (key, texts)
    assert all("node's leader" in result["leader_state"] for rank, result in enumerate(mismatch_results) if rank in (1, 3))


def test_uniform_or_unknown_topology_falls_back_to_flat(fallback_results: list[dict]) -> None:
    reasons = {"one_per_node": "one process", "one_node": "one node", "unknown": "unknown", "hierarchical_false": "hierarchical=False"}
    for result in fallback_results:
        for name, reason in reasons.items():
            got = result[name]
            assert got["topology"]["path"] == "flat", (name, got)
            assert reason in got["topology"]["reason"], (name, got)
            assert got["links"] == ["flat"]
            assert got["error"] < 1e-5, (name, got["error"])


def test_plan_topology_is_a_function_of_the_gathered_rows() -> None:
    def rows(keys: list[int], option: int = 0, adaptive: bool = False) -> list[Placement]:
        return [Placement(True, key, option, adaptive) for key in keys]

    assert plan_topology(rows([5, 5, 9, 9]))[0] == Topology(((0, 1), (2, 3)))
    assert plan_topology(rows([9, 5, 9, 5]))[0] == Topology(((0, 2), (1, 3)))  # nodes ordered by lowest rank
    assert plan_topology(rows([0, 0, 0, 1, 1, 1]))[0].processes_per_node == 3
    assert plan_topology(rows([0, 0, 1]))[0] is None
    assert plan_topology(rows([0, 0, 1, 1], adaptive=True))[0] is None
    with pytest.raises(ValueError, match="hierarchical=True"):
        plan_topology(rows([0, 0, 1], option=2))
    with pytest.raises(ValueError, match="disagree"):
        plan_topology(rows([0, 0]) + rows([1, 1], option=1))
    with pytest.raises(ValueError, match="'auto', True or False"):
        gcomp.TopKState(hierarchical="yes")
