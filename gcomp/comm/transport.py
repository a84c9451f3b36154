"""Blocking collectives that count their bytes.

Called only from the communication thread (``worker.py``), so blocking is fine and the order of
calls is the order of buckets. The module knows nothing about compression: it moves tensors and
adds what it moved to a :class:`~gcomp.metrics.TrafficStats`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..metrics import TrafficStats


class Transport:
    """Collectives on one process group (``None`` = the default group)."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    def allreduce_sum_(self, tensor: torch.Tensor, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place. Every rank gets bitwise the same result."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        if traffic is not None:
            size = tensor.numel() * tensor.element_size()
            traffic.record_collective(sent=size, received=size)
        return tensor

    def allgather(self, message: torch.Tensor, traffic: Optional[TrafficStats]) -> torch.Tensor:
        """Concatenate equal-size 1-D messages of all ranks: row r of the result is rank r's."""
        world = self.world_size
        gathered = torch.empty(world * message.numel(), dtype=message.dtype, device=message.device)
        dist.all_gather_into_tensor(gathered, message.contiguous(), group=self.process_group)
        gathered = gathered.view(world, message.numel())
        if traffic is not None:
            size = message.numel() * message.element_size()
            traffic.record_collective(sent=size, received=(world - 1) * size)
        return gathered
