"""Blocking collectives that count their bytes, on a communicator of gcomp's own.

Called only from the communication thread (``worker.py``), so blocking is fine and the order of
calls is the order of buckets. The module knows nothing about compression: it moves tensors and
adds what it moved, and how long it took, to a :class:`~gcomp.metrics.TrafficStats`.

Why a communicator of its own: DDP issues collectives of its own on the model's process group
from the autograd thread, e.g. the allreduce of the "which parameters were used" map right after
the last bucket with ``find_unused_parameters=True``. Those race with the communication thread's
collectives, and on gloo two ranks issuing them in different orders pair the wrong messages
("Received data size doesn't match expected size"). gcomp therefore runs its collectives on a
separate group over the same ranks (created once, the first time a hook runs, on every rank at the
same point), so the two streams never interleave on one communicator.

Devices: collectives take tensors where the bucket lives. NCCL needs CUDA tensors; gloo takes CPU
tensors and, for allreduce, CUDA tensors too (it stages them through host memory). gloo's
gather-into-one-tensor on CUDA tensors has known crashes (pytorch#152645), so an allgather of a
CUDA message over gloo is staged through the CPU here, explicitly; a broadcast too, the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..metrics import TrafficStats

# torch >= 2.13 names the single-tensor allgather ``all_gather_single`` and warns on the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Transport:
    """Collectives over the ranks of ``process_group`` (``None`` = the default group), run on a
    dedicated group with the same ranks (see the module docstring).

    ``link`` names the kind of link the collectives cross, for the per-link byte counts of
    :class:`~gcomp.metrics.TrafficStats`: ``"flat"`` (all ranks, whatever links join them),
    ``"intra_node"`` or ``"inter_node"`` (the hierarchical path, :mod:`gcomp.comm.topology`).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, *, link: str = "flat") -> None:
        self.model_group = process_group
        self.link = link
        self._group: Optional[dist.ProcessGroup] = None

    @classmethod
    def on_group(cls, group: dist.ProcessGroup, link: str) -> "Transport":
        """A transport over ``group`` itself, a group gcomp created for its own use (no further
        dedicated group is made)."""
        transport = cls(group, link=link)
        transport._group = group
        return transport

    def ensure_group(self) -> None:
        """Create the dedicated group. Must run on every rank at the same point (the first hook
        call), not on the communication thread."""
        if self._group is not None:
            return
        ranks = dist.get_process_group_ranks(self.model_group or dist.group.WORLD)
        self._group = dist.new_group(ranks=ranks, backend=dist.get_backend(self.model_group))

    @property
    def process_group(self) -> Optional[dist.ProcessGroup]:
        """The group collectives run on."""
        return self._group if self._group is not None else self.model_group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.process_group))

    def small_tensor_device(self, device: torch.device) -> torch.device:
        """Where small host-built tensors (checksums, error tables) go for a collective next to a
        bucket on ``device``: the CPU for gloo, the bucket's device for NCCL (and any other)."""
        return torch.device("cpu") if self.backend == "gloo" else device

    def allreduce_sum_(self, tensor: torch.Tensor, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place. Every rank gets bitwise the same result."""
        with TrafficStats.timed(traffic, "collective"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        if traffic is not None:
            size = tensor.numel() * tensor.element_size()
            traffic.record_collective(sent=size, received=size, link=self.link)
        return tensor

    def reduce_sum_(self, tensor: torch.Tensor, root: int, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Sum ``tensor`` over ranks into group rank ``root``'s ``tensor`` (the others' is left
        unspecified). Staged through the CPU for a CUDA tensor on gloo, whose reduce is CPU-only."""
        staged = tensor.is_cuda and self.backend == "gloo"
        source = tensor.cpu() if staged else tensor
        with TrafficStats.timed(traffic, "collective"):
            dist.reduce(source, dst=dist.get_global_rank(self.process_group, root), op=dist.ReduceOp.SUM, group=self.process_group)
        if staged and self.rank == root:
            tensor.copy_(source)
        if traffic is not None:
            size = tensor.numel() * tensor.element_size()
            is_root = self.rank == root
            traffic.record_collective(sent=0 if is_root else size, received=(self.world_size - 1) * size if is_root else 0, link=self.link)
        return tensor

    def allgather(self, message: torch.Tensor, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Concatenate equal-size 1-D messages of all ranks: row r of the result is rank r's."""
        world = self.world_size
        staged = message.is_cuda and self.backend == "gloo"
        source = message.cpu() if staged else message.contiguous()
        gathered = source.new_empty(world * message.numel())
        with TrafficStats.timed(traffic, "collective"):
            _all_gather_single(gathered, source, group=self.process_group)
        if staged:
            gathered = gathered.to(message.device)
        if traffic is not None:
            size = message.numel() * message.element_size()
            traffic.record_collective(sent=size, received=(world - 1) * size, link=self.link)
        return gathered.view(world, message.numel())

    def broadcast_(self, tensor: torch.Tensor, root: int, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``root``'s (a rank of this group), in place.

        Counted as the root sending ``tensor`` once and every other rank receiving it once: the
        bytes are those of one message whatever the world size.
        """
        world = self.world_size
        if not 0 <= root < world:
            raise ValueError(f"broadcast root must be a rank in [0, {world}); got {root}")
        staged = tensor.is_cuda and self.backend == "gloo"
        target = tensor.cpu() if staged else tensor
        with TrafficStats.timed(traffic, "collective"):
            dist.broadcast(target, group=self.process_group, group_src=root)
        if staged:
            tensor.copy_(target)
        if traffic is not None:
            size = tensor.numel() * tensor.element_size()
            is_root = self.rank == root
            traffic.record_collective(sent=size if is_root else 0, received=0 if is_root else size, link=self.link)
        return tensor
