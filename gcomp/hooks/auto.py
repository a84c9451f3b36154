"""``"auto"``: the method whose step is predicted fastest on this run, chosen by measuring.

DDP fixes a model's hook function when it is registered, so "auto" is one hook state that owns
one state per candidate method (``"allreduce"``, ``"powersgd"``, ``"topk"``, optionally
``"quantize"``) and hands every bucket of a step to the *active* one. The candidates share this
state's communication thread, transport (so their collectives keep one order on every rank),
layer names, step lifecycle (a non-finite bucket drops every candidate's staged updates) and
traffic counters (``stats()`` counts the run as a whole); each keeps its own per-layer tensors.

The schedule, run by :class:`gcomp.adaptive.timeaware.TimeAwareController`:

- ``warmup_steps`` dense steps (measured: link, backward schedule, step time);
- ``trial_steps`` compressed steps of each compressing candidate in turn (measured: their compute);
- the decision: the dense method, or one compressing method with each layer dense or compressed,
  whichever is predicted fastest (ties within the tolerance go to the earlier candidate: dense
  first). The other candidates' tensors are released.

The active candidate and every candidate's per-layer state and dense layers are in
``state_dict()``, so a resumed run continues bit for bit. Candidates' options:
``powersgd_options`` / ``topk_options`` / ``quantize_options`` (keyword arguments of their state
classes), with ``rank`` and ``density`` as shortcuts. PowerSGD's candidate sends its factors in
bfloat16 by default (``powersgd_options={"factor_dtype": "float32"}`` for PyTorch's format).

Example::

    state = gcomp.register(ddp_model, "auto", rank=4, density=0.01, warmup_steps=10)
    ...
    state.stats()["time_aware"]["decision"]["choice"]   # "allreduce", "powersgd" or "topk"
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..comm import CommWorker
from .base import HookState, make_hook
from .baseline import AllreduceState
from .layout import BucketLayout
from .powersgd import PowerSGDState
from .quantize import QuantizeState
from .store import LayerStore
from .topk import TopKState

CANDIDATES: dict[str, type[HookState]] = {
    "allreduce": AllreduceState,
    "powersgd": PowerSGDState,
    "topk": TopKState,
    "quantize": QuantizeState,
}
DEFAULT_CANDIDATES = ("allreduce", "powersgd", "topk")


class AutoState(HookState):
    """Hyperparameters and state of the ``"auto"`` hook (register with :func:`auto_hook`).

    Args:
        process_group: the DDP process group (``None``: default group).
        candidates: methods to choose from, in order of preference among equally fast ones.
        warmup_steps: dense sync steps first (measured; at least the time-aware ``skip_steps + 1``).
        rank: PowerSGD's rank (shortcut for ``powersgd_options["rank"]``).
        density: top-k's density (shortcut for ``topk_options["density"]``).
        powersgd_options, topk_options, quantize_options: keyword arguments of the candidates'
            states (their warm-up is this state's; ``worker`` and ``process_group`` are shared).
        time_aware: a :class:`gcomp.adaptive.TimeAwareConfig` (trial steps, tolerance).
        worker: share a communication thread with another state in the same process.
    """

    method = "auto"

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
        warmup_steps: int = 10,
        rank: Optional[int] = None,
        density: Optional[float] = None,
        powersgd_options: Optional[Mapping[str, Any]] = None,
        topk_options: Optional[Mapping[str, Any]] = None,
        quantize_options: Optional[Mapping[str, Any]] = None,
        time_aware: Optional[Any] = None,
        worker: Optional[CommWorker] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        candidates = tuple(candidates)
        unknown = [name for name in candidates if name not in CANDIDATES]
        if not candidates or unknown or len(set(candidates)) != len(candidates):
            raise ValueError(f"candidates must be distinct methods among {list(CANDIDATES)}; got {list(candidates)}")
        super().__init__(process_group, warmup_steps=warmup_steps, worker=worker, hierarchical=hierarchical)
        options: dict[str, dict[str, Any]] = {
            "allreduce": {},
            "powersgd": dict(powersgd_options or {}),
            "topk": dict(topk_options or {}),
            "quantize": dict(quantize_options or {}),
        }
        # The choice is made for speed: PowerSGD's factors travel in bfloat16 unless told otherwise
        # (RESULTS §16/16b: 0.56x the bytes of float32 factors, the fastest PowerSGD at 100 Mbit/s
        # and 1 Gbit/s, validation loss -0.13 % / +0.26 % against float32 factors).
        options["powersgd"].setdefault("factor_dtype", "bfloat16")
        if rank is not None:
            options["powersgd"]["rank"] = rank
        if density is not None:
            options["topk"]["density"] = density
        for name, given in options.items():
            shared = {"process_group", "worker", "warmup_steps", "hierarchical"} & set(given)
            if shared:
                raise ValueError(f"{name}_options may not set {sorted(shared)}: the candidates share this state's")
        self.candidates = candidates
        self.children: dict[str, HookState] = {}
        for name in candidates:
            child = CANDIDATES[name](process_group, warmup_steps=0, worker=self.worker, **options[name])
            child.transport, child.names, child.lifecycle, child.traffic = self.transport, self.names, self.lifecycle, self.traffic
            child.codec_transport = self.codec_transport
            self.children[name] = child
        self.active = candidates[0]
        from ..adaptive.timeaware import TimeAwareConfig, TimeAwareController  # the controller imports this module

        TimeAwareController(self, time_aware if time_aware is not None else TimeAwareConfig())

    def config(self) -> dict[str, Any]:
        return {**super().config(), "candidates": list(self.candidates),
                "children": {name: child.config() for name, child in self.children.items()}}

    def decided_settings(self) -> dict[str, Any]:
        children = {name: {"overrides": dict(child.layer_overrides()), **child.decided_settings()} for name, child in self.children.items()}
        return {**super().decided_settings(), "active": self.active, "children": children}

    def set_preconditioner(self, precondition: Any, parameters: Any = None) -> None:
        if precondition is not None:
            raise ValueError("method 'auto' does not support precondition; choose a method explicitly")

    def _choose_path(self, device: torch.device) -> None:
        """Flat or hierarchical, decided once for this state; the candidates' codecs then run over
        the same group (all ranks, or the node leaders)."""
        super()._choose_path(device)
        for child in self.children.values():
            child.codec_transport, child.node_groups, child.path_reason = self.codec_transport, self.node_groups, self.path_reason

    # ------------------------------------------------------------------ the choice
    def select(self, name: str) -> None:
        """Hand the coming steps' buckets to candidate ``name`` (between steps, on every rank
        alike: the next step proves every rank made the same choice)."""
        if name not in self.children:
            raise ValueError(f"{name!r} is not a candidate of this auto state ({list(self.candidates)})")
        self.active = name
        self.settings_changed()

    def release_unchosen(self) -> None:
        """Free the tensors of the candidates that were not chosen (after the decision)."""
        for name, child in self.children.items():
            if name != self.active:
                child.store.load_state_dict({}, keep_per_rank=False)
                child.settings_changed()
                workspaces = getattr(child, "_workspaces", None)
                if workspaces is not None:
                    workspaces.clear()

    def dense_from_step(self) -> Optional[int]:
        """Dense chosen at step D: DDP's own allreduce from step D + 2. Step D + 1's buckets queue
        behind the decision on the communication thread, and DDP waits for them before step D + 2."""
        decision = self.time_controller.decision if self.time_controller is not None else None
        if self.active != "allreduce" or decision is None:
            return None
        return int(decision["step"]) + 2

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        return self.children[self.active].reduce(buffer, layout, step)

    # ------------------------------------------------------------------ state of the candidates
    def _stores(self) -> list[LayerStore]:
        return [self.store] + [child.store for child in self.children.values()]

    def memory_bytes(self) -> dict[str, int]:
        out = super().memory_bytes()
        for child in self.children.values():
            for kind, value in child.memory_bytes().items():
                out[kind] += value
        return out

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["active"] = self.active
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["active"] = self.active
        out["candidates"] = {
            name: {"layers": child.store.state_dict(), "overrides": dict(child.layer_overrides()), "dense_layers": sorted(child.dense_layers)}
            for name, child in self.children.items()
        }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved_world = state.get("world_size")
        keep_per_rank = saved_world is None or not dist.is_initialized() or saved_world == self.transport.world_size
        for name, saved in state.get("candidates", {}).items():
            child = self.children.get(name)
            if child is None:
                continue
            child.store.load_state_dict(saved.get("layers", {}), keep_per_rank)
            child.set_layer_overrides(saved.get("overrides", {}))
            child.set_dense_layers(saved.get("dense_layers", ()))
        self.select(state.get("active", self.active))


auto_hook = make_hook(AutoState, "auto_hook")
