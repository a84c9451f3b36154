"""PowerSGD (Vogels et al., NeurIPS 2019) as a DDP comm hook: rank-r factors instead of gradients.

Follow one bucket through :meth:`PowerSGDState.reduce`:

1. Split the bucket's layers into *compressed* matrices (those whose factors are
   ``min_compression_rate`` times smaller, see :func:`~gcomp.compress.lowrank.should_compress`) and
   *dense* leftovers (biases, norms, small matrices). Same-shape matrices form one batch.
2. ``M = gradient + residual`` (error feedback), ``P = M Q`` with ``Q`` the warm-start factor of
   the previous step (or, on the first step / without warm start, a random matrix drawn from a
   generator seeded by ``seed`` and the layer name: identical on every rank).
3. **Collective 1**: one allreduce of ``[dense leftovers | all P of the bucket]``. If any rank's
   input held inf/NaN, this sum is non-finite on every rank: an inf or NaN entry of ``M`` makes
   its whole row of ``P = M Q`` non-finite (``inf * q`` is inf, ``inf * 0`` is NaN), and sums keep it.
4. Orthogonalise P, ``Q = M^T P``. **Collective 2**: one allreduce of all Q of the bucket, / world.
5. Write ``P Q^T`` (identical on every rank) into the bucket; residual ``M - P Q^T`` and ``Q`` are
   staged and committed at the end of the step unless some bucket of the step was non-finite.

Memory traffic matters more than flops here (the products are thin, ``r`` columns): per compressed
layer the codec makes five passes over the gradient (``M = g + e``, ``P``, ``Q``, ``P Q^T`` into
the bucket, ``e = M - P Q^T``), and ``M`` is built in one of two persistent workspaces per matrix
group (the other holds the committed residual it reads), so no step allocates gradient-sized
memory.

Two collectives per bucket, each issued by the communication thread in bucket order.

Tuning guide (same knobs as PyTorch's ``PowerSGDState``):

- ``rank``: 1-4 for vision models, larger (8-32) for language models; bytes grow linearly in it.
- ``warmup_steps``: sync steps of plain allreduce first (PyTorch recommends ~10% of training or
  at least the LR warm-up; 0 is allowed, state is kept per layer so DDP's bucket rebuild after
  step 1 does not disturb it).
- ``min_compression_rate``: raise it to keep more small matrices dense (exact, cheap in bytes).
- ``warm_start`` and ``error_feedback``: keep both on unless you are measuring their effect.
- ``factor_dtype``: ``"bfloat16"`` (or ``"float16"``) sends P and Q in half precision: half the
  bytes at the same rank, for links where the factors' transfer is what the step waits for. The
  products are still formed in float32 and the residual ``M - P Q^T`` is taken with the rounded
  factors every rank received, so the rounding is fed back like the low-rank error. P then
  travels in its own allreduce (dense leftovers stay float32): one more collective per bucket.
  float16 can overflow with large loss scales (the step is skipped on every rank, as any
  non-finite step); bfloat16 keeps float32's range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AbstractSet, Any, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..comm import CommWorker
from ..compress.lowrank import effective_rank, matrix_shape, orthogonalize_, should_compress
from ..metrics import TrafficStats
from .base import HookState, make_hook
from .layout import BucketLayout, LayerSlot


@dataclass(frozen=True)
class _MatrixGroup:
    """Compressed layers of one bucket that share ``(n, m, rank)``: one ``bmm`` for all of them."""

    n: int
    m: int
    rank: int
    layers: tuple[LayerSlot, ...]
    p_offset: int  # into the P part of collective 1
    q_offset: int  # into collective 2

    @property
    def p_numel(self) -> int:
        return len(self.layers) * self.n * self.rank

    @property
    def q_numel(self) -> int:
        return len(self.layers) * self.m * self.rank

    def p_view(self, p_all: torch.Tensor) -> torch.Tensor:
        return p_all.narrow(0, self.p_offset, self.p_numel).view(len(self.layers), self.n, self.rank)

    def q_view(self, q_all: torch.Tensor) -> torch.Tensor:
        return q_all.narrow(0, self.q_offset, self.q_numel).view(len(self.layers), self.m, self.rank)


@dataclass(frozen=True)
class PowerSGDPlan:
    """How one bucket layout is reduced: dense leftovers, and compressed matrices by group."""

    dense: tuple[LayerSlot, ...]
    dense_numel: int
    groups: tuple[_MatrixGroup, ...]
    p_numel: int
    q_numel: int


class PowerSGDState(HookState):
    """Hyperparameters and state of the PowerSGD hook (register with :func:`powersgd_hook`).

    Args:
        process_group: the DDP process group (``None``: default group).
        rank: rank of the approximation (>= 1), the same for every compressed layer unless
            ``layer_ranks`` overrides it.
        warmup_steps: sync steps of plain allreduce before compression starts.
        min_compression_rate: compress a layer only if ``(n + m) * rank * rate < n * m``.
        warm_start: reuse last step's Q (better approximation at no extra cost).
        error_feedback: add each rank's residual back into its next gradient.
        orthogonalization_epsilon: added to column norms in Gram-Schmidt (zero columns stay zero).
        seed: seeds the shared random Q; every rank must use the same.
        factor_dtype: dtype of P and Q on the wire: ``"float32"`` (the default, as PyTorch's hook),
            ``"bfloat16"`` or ``"float16"`` (half the bytes; see the tuning guide).
        layer_ranks: per-layer rank overrides ``{parameter name: rank}`` (the adaptive controller
            sets these).
        worker: share a communication thread with another state in the same process.
        hierarchical: ``"auto"`` (default): on several nodes with several processes each, sum
            densely inside each node and run PowerSGD among one leader per node; ``True``
            requires that path, ``False`` never takes it (see :mod:`gcomp.comm.topology`).

    Example::

        state = gcomp.PowerSGDState(rank=4, warmup_steps=100)
        ddp_model.register_comm_hook(state, gcomp.powersgd_hook)
    """

    method = "powersgd"
    replicated_tensors = ("q",)
    per_rank_tensors = ("error",)
    gradient_valued_tensors = ("error",)  # Q only sets directions: P is orthonormalised

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        rank: int = 4,
        warmup_steps: int = 10,
        min_compression_rate: float = 2.0,
        warm_start: bool = True,
        error_feedback: bool = True,
        orthogonalization_epsilon: float = 0.0,
        seed: int = 0,
        factor_dtype: Union[str, torch.dtype] = "float32",
        layer_ranks: Optional[Mapping[str, int]] = None,
        worker: Optional[CommWorker] = None,
        hierarchical: Union[str, bool] = "auto",
    ) -> None:
        _check_rank("rank", rank)
        factor_dtype_name = _factor_dtype_name(factor_dtype)
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) or not (
            math.isfinite(min_compression_rate) and min_compression_rate > 0
        ):
            raise ValueError(f"min_compression_rate must be a finite number > 0 (default 2); got {min_compression_rate!r}")
        if isinstance(orthogonalization_epsilon, bool) or not isinstance(orthogonalization_epsilon, (int, float)) or not (
            math.isfinite(orthogonalization_epsilon) and orthogonalization_epsilon >= 0
        ):
            raise ValueError(f"orthogonalization_epsilon must be a finite number >= 0; got {orthogonalization_epsilon!r}")
        for name, value in (("warm_start", warm_start), ("error_feedback", error_feedback)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False; got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {seed!r}")
        super().__init__(process_group, warmup_steps=warmup_steps, worker=worker, hierarchical=hierarchical)
        self.rank = rank
        self.min_compression_rate = float(min_compression_rate)
        self.warm_start = warm_start
        self.error_feedback = error_feedback
        self.orthogonalization_epsilon = float(orthogonalization_epsilon)
        self.seed = seed
        self.factor_dtype_name = factor_dtype_name
        # None: the factors travel in the compute dtype, P inside collective 1 (PyTorch's layout).
        self.factor_dtype: Optional[torch.dtype] = None if factor_dtype_name == "float32" else getattr(torch, factor_dtype_name)
        self.layer_ranks: dict[str, int] = {}
        self._workspaces: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = {}
        if layer_ranks:
            self.set_layer_ranks(layer_ranks)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "rank": self.rank,
            "min_compression_rate": self.min_compression_rate,
            "warm_start": self.warm_start,
            "error_feedback": self.error_feedback,
            "orthogonalization_epsilon": self.orthogonalization_epsilon,
            "seed": self.seed,
            "factor_dtype": self.factor_dtype_name,
        }

    def layer_overrides(self) -> Mapping[str, int]:
        return self.layer_ranks

    def set_layer_overrides(self, overrides: Mapping[str, Any]) -> None:
        self.set_layer_ranks(overrides)

    def set_layer_ranks(self, layer_ranks: Mapping[str, int]) -> None:
        """Per-layer ranks ``{parameter name: rank}`` (applied from the next bucket on; call
        between steps, on every rank alike: the next step proves every rank holds the same). A
        layer whose rank changes keeps the leading columns of its warm-start Q; new columns come
        from the shared generator, so all ranks stay identical. Unknown names raise at that step."""
        if not isinstance(layer_ranks, Mapping):
            raise TypeError(f"layer_ranks must be a mapping {{parameter name: rank}}; got {layer_ranks!r}")
        for name, rank in layer_ranks.items():
            if not isinstance(name, str):
                raise TypeError(f"layer_ranks keys must be parameter names (str); got {name!r}")
            _check_rank(f"layer_ranks[{name!r}]", rank)
        self.layer_ranks = dict(layer_ranks)
        self.settings_changed()

    def settings_changed(self) -> None:
        """New per-layer settings (ranks, layers sent dense) regroup the matrices: a group's
        workspaces no longer fit it."""
        super().settings_changed()
        self._workspaces.clear()

    def _workspace_tensors(self) -> list[torch.Tensor]:
        return [workspace for pool in self._workspaces.values() for workspace in pool]

    # ------------------------------------------------------------------ the codec
    def _build_plan(self, layout: BucketLayout, dense_layers: Optional[AbstractSet[str]] = None) -> PowerSGDPlan:
        """``dense_layers``: layers sent dense whatever their rank (default: the state's own, see
        :meth:`HookState.set_dense_layers`; the time-aware choice passes an empty set to see which
        layers *could* be compressed)."""
        forced = self.dense_layers if dense_layers is None else dense_layers
        dense: list[LayerSlot] = []
        grouped: dict[tuple[int, int, int], list[LayerSlot]] = {}
        for slot in layout.layers:
            rank = self.layer_ranks.get(slot.name, self.rank)
            if slot.numel > 0 and slot.name not in forced and should_compress(slot.shape, rank, self.min_compression_rate):
                n, m = matrix_shape(slot.shape)
                grouped.setdefault((n, m, effective_rank(n, m, rank)), []).append(slot)
            else:
                dense.append(slot)
        groups = []
        p_offset = q_offset = 0
        for (n, m, rank), slots in grouped.items():
            group = _MatrixGroup(n=n, m=m, rank=rank, layers=tuple(slots), p_offset=p_offset, q_offset=q_offset)
            groups.append(group)
            p_offset += group.p_numel
            q_offset += group.q_numel
        return PowerSGDPlan(
            dense=tuple(dense), dense_numel=sum(s.numel for s in dense), groups=tuple(groups), p_numel=p_offset, q_numel=q_offset
        )

    def _initial_q(self, layer: str, m: int, rank: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Q for ``layer`` this step: the stored warm-start factor (its leading columns if the rank
        grew or shrank) completed by columns from the shared generator, on ``like``'s device."""
        stored = self.store.peek(layer, "q") if self.warm_start else None
        if stored is not None and (stored.shape[0] != m or stored.dtype != like.dtype):
            stored = None
        if stored is not None and stored.device != like.device:
            stored = stored.to(like.device)
        kept = 0 if stored is None else min(rank, stored.shape[1])
        if kept == rank:
            return stored.narrow(1, 0, rank)
        seed_step = "warm" if self.warm_start else step
        fresh = self.shared_randn((m, rank - kept), (self.seed, layer, rank, seed_step), like)
        fresh = orthogonalize_(fresh.unsqueeze(0), self.orthogonalization_epsilon).squeeze(0)
        return fresh if kept == 0 else torch.cat([stored.narrow(1, 0, kept), fresh], dim=1)

    def _workspace(self, layout: BucketLayout, index: int, group: _MatrixGroup, like: torch.Tensor) -> torch.Tensor:
        """A persistent ``(b, n, m)`` tensor for this group's ``M`` that does not hold the residual
        the group reads this step. Two per group alternate: the committed residuals are views of
        one, so ``M = g + e`` is written into the other. A step that is dropped (non-finite)
        commits nothing and its workspace is simply reused next step."""
        key = (layout.fingerprint, index, like.dtype)
        pool = self._workspaces.setdefault(key, [])
        busy = set()  # workspaces whose slices are committed residuals (views keep their base)
        for slot in group.layers:
            residual = self.store.peek(slot.name, "error")
            if residual is not None and residual._base is not None:
                busy.add(id(residual._base))
        shape = (len(group.layers), group.n, group.m)
        for workspace in pool:
            if id(workspace) not in busy and workspace.device == like.device and tuple(workspace.shape) == shape:
                return workspace
        workspace = like.new_empty(shape)
        if len(pool) < 2:
            pool.append(workspace)
        return workspace

    def reduce(self, buffer: torch.Tensor, layout: BucketLayout, step: int) -> torch.Tensor:
        plan: PowerSGDPlan = self.plan_for(layout, self._build_plan)
        world = self.codec_transport.world_size
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        element = torch.finfo(dtype).bits // 8
        wire = self.factor_dtype  # None: P rides in collective 1, in the compute dtype
        factor_element = element if wire is None else torch.finfo(wire).bits // 8

        # Collective 1: [dense leftovers | P of every compressed layer] (P apart with factor_dtype).
        with TrafficStats.timed(self.traffic, "compress"):
            message = buffer.new_empty(plan.dense_numel + (plan.p_numel if wire is None else 0), dtype=dtype)
            position = 0
            for slot in plan.dense:
                message.narrow(0, position, slot.numel).copy_(slot.flat(buffer))
                position += slot.numel
            p_all = message.narrow(0, plan.dense_numel, plan.p_numel) if wire is None else message.new_empty(plan.p_numel)
            inputs: list[torch.Tensor] = []
            for group_index, group in enumerate(plan.groups):
                matrices = self._workspace(layout, group_index, group, message)
                factors = message.new_empty((len(group.layers), group.m, group.rank))
                for index, slot in enumerate(group.layers):
                    gradient = slot.flat(buffer).view(group.n, group.m)
                    residual = (
                        self.store.get(slot.name, "error", (group.n, group.m), dtype, buffer.device) if self.error_feedback else None
                    )
                    if residual is not None:
                        torch.add(gradient, residual, out=matrices.select(0, index))
                    else:
                        matrices.select(0, index).copy_(gradient)
                    factors.select(0, index).copy_(self._initial_q(slot.name, group.m, group.rank, step, message))
                torch.bmm(matrices, factors, out=group.p_view(p_all))
                inputs.append(matrices)

        finite = self._exchange_p(message, p_all, wire)
        self._record_traffic(plan, buffer.element_size(), element, factor_element)

        if not finite:
            # Some rank had inf/NaN (in a dense leftover, or in a compressed layer's input, which
            # makes its rows of P non-finite): every rank sees the same non-finite sum, so every
            # rank skips the Q exchange, leaves its state untouched and hands GradScaler a
            # non-finite bucket.
            self.skip_step(buffer, layout, step)
            self._write_dense(buffer, plan, message, world)
            for group in plan.groups:
                for slot in group.layers:
                    slot.flat(buffer).fill_(math.nan)
            return buffer
        self._write_dense(buffer, plan, message, world)
        if self.observer is not None:  # only finite steps are profiled
            for group, matrices in zip(plan.groups, inputs):
                for index, slot in enumerate(group.layers):
                    self.observer(slot.name, slot.shape, matrices.select(0, index))

        # Collective 2: Q of every compressed layer.
        with TrafficStats.timed(self.traffic, "compress"):
            q_all = message.new_empty(plan.q_numel)
            for group, matrices in zip(plan.groups, inputs):
                p = group.p_view(p_all)
                orthogonalize_(p, self.orthogonalization_epsilon)
                torch.bmm(matrices.transpose(1, 2), p, out=group.q_view(q_all))
        if plan.q_numel:
            if wire is None:
                self.codec_transport.allreduce_sum_(q_all, self.traffic)
            else:
                q_all.copy_(self.codec_transport.allreduce_sum_(q_all.to(wire), self.traffic))
            q_all.div_(world)

        with TrafficStats.timed(self.traffic, "decompress"):
            for group, matrices in zip(plan.groups, inputs):
                p, q = group.p_view(p_all), group.q_view(q_all)
                if buffer.dtype == dtype:
                    # P Q^T straight into the bucket, then the residual from it: no temporary.
                    for index, slot in enumerate(group.layers):
                        approximation = slot.flat(buffer).view(group.n, group.m)
                        torch.mm(p.select(0, index), q.select(0, index).T, out=approximation)
                        if self.error_feedback:
                            matrices.select(0, index).sub_(approximation)  # now the residual
                else:  # half-precision bucket: the residual keeps the fp32 approximation
                    approximations = torch.bmm(p, q.transpose(1, 2))
                    for index, slot in enumerate(group.layers):
                        slot.flat(buffer).view(group.n, group.m).copy_(approximations.select(0, index))
                    if self.error_feedback:
                        matrices.sub_(approximations)
                for index, slot in enumerate(group.layers):
                    update = {}
                    if self.error_feedback:
                        update["error"] = matrices.select(0, index)
                    if self.warm_start:
                        update["q"] = q.select(0, index)
                    self.store.stage(slot.name, update)
        return buffer

    def _write_dense(self, buffer: torch.Tensor, plan: PowerSGDPlan, message: torch.Tensor, world: int) -> None:
        dense = message.narrow(0, 0, plan.dense_numel).div_(world)
        position = 0
        for slot in plan.dense:
            slot.flat(buffer).copy_(dense.narrow(0, position, slot.numel))
            position += slot.numel

    def _exchange_p(self, message: torch.Tensor, p_all: torch.Tensor, wire: Optional[torch.dtype]) -> bool:
        """Sum collective 1 over ranks (and P in ``wire``'s dtype when it travels apart, the sum
        written back into ``p_all``); whether every summed value is finite (the same answer on
        every rank, since every rank holds the same sums)."""
        if wire is None or message.numel():
            self.codec_transport.allreduce_sum_(message, self.traffic)
        if wire is None:
            return self.worker.runtime.all_finite(message)
        if p_all.numel():
            p_all.copy_(self.codec_transport.allreduce_sum_(p_all.to(wire), self.traffic))
        # An overflow on the wire (float16) shows up here as inf in the float32 copy. One host
        # read for both sums: a float64 sum is finite iff every entry is.
        health = message.sum(dtype=torch.float64) + p_all.sum(dtype=torch.float64)
        return self.worker.runtime.all_finite(health.reshape(1))

    def _record_traffic(self, plan: PowerSGDPlan, bucket_element: int, element: int, factor_element: int) -> None:
        for slot in plan.dense:
            self.traffic.record_layer(slot.name, slot.shape, "dense", slot.numel * element, slot.numel * bucket_element)
        for group in plan.groups:
            for slot in group.layers:
                self.traffic.record_layer(
                    slot.name, slot.shape, f"rank={group.rank}", (group.n + group.m) * group.rank * factor_element,
                    slot.numel * bucket_element,
                )


FACTOR_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _factor_dtype_name(factor_dtype: Any) -> str:
    if isinstance(factor_dtype, torch.dtype):
        factor_dtype = str(factor_dtype).replace("torch.", "")
    if not isinstance(factor_dtype, str) or factor_dtype not in FACTOR_DTYPE_NAMES:
        raise ValueError(f"factor_dtype must be one of {list(FACTOR_DTYPE_NAMES)}; got {factor_dtype!r}")
    return factor_dtype


def _check_rank(name: str, rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{name} must be an integer >= 1 (the rank of the low-rank approximation); got {rank!r}")


powersgd_hook = make_hook(PowerSGDState, "powersgd_hook")
