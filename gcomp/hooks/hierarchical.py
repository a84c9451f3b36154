"""One bucket on the hierarchical path: dense reduce inside the node, the codec among the node
leaders, dense broadcast inside the node (:mod:`gcomp.comm.topology` says when and why).

Every rank divides its bucket by the node's process count and the node's ranks sum it into the
leader's bucket (divided first, as DDP does for half precision, so the sum stays in range). The
leader runs exactly what the flat path runs (warm-up average or the codec, with its state, its
agreement checks and its non-finite skip) over the leaders' group, whose size divides once more:
``sum / (processes per node x nodes)`` is the global mean. The leader then broadcasts a three-entry
status to its node, ``[failed, step non-finite, step sent compressed]``, and, unless it failed, the averaged bucket.

The status makes the guarantees of the flat path hold on ranks that never run the codec:

- **non-finite**: a non-finite gradient anywhere reaches its leader through the dense sum, the
  leaders skip together (their decision comes from exchanged data), and every other rank marks
  its step skipped from the status, so ``StepLifecycle`` drops the step's staged state on every
  rank (a preconditioner's moments included);
- **errors raise on every rank**: an error in the leader's codec (e.g. an agreement check among
  the leaders after inconsistent checkpoints) is sent to its node with the status, and the node's
  other ranks raise it too, instead of waiting for a broadcast that never comes.

The status costs one 24-byte broadcast per bucket inside the node, and one host read on the
non-leaders (on the communication thread, where the flat path makes host reads too).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..comm.topology import LEADER

if TYPE_CHECKING:
    from .base import HookState
    from .layout import BucketLayout

logger = logging.getLogger(__name__)


def reduce_within_nodes(state: "HookState", buffer: torch.Tensor, layout: "BucketLayout", step: int) -> torch.Tensor:
    """Average ``buffer`` over every rank via the node leaders; runs on the communication thread."""
    groups = state.node_groups
    assert groups is not None
    intra = groups.intra
    buffer.div_(intra.world_size)
    intra.reduce_sum_(buffer, LEADER, state.traffic)
    status_device = intra.small_tensor_device(buffer.device)
    if groups.is_leader:
        failure = None
        try:
            result = state._average(buffer, layout, step)
            if result is not buffer:
                buffer.copy_(result)
        except Exception as error:  # noqa: BLE001 - sent to the node, then raised here too
            failure = error
        flags = [int(failure is not None), int(not state.lifecycle.finite), int(state.traffic.step_sent_compressed)]
        status = torch.tensor(flags, dtype=torch.int64, device=status_device)
        intra.broadcast_(status, LEADER, state.traffic)
        if failure is not None:
            dist.broadcast_object_list([_failure_text(failure)], src=dist.get_global_rank(intra.process_group, LEADER),
                                       group=intra.process_group)
            raise failure
    else:
        status = torch.zeros(3, dtype=torch.int64, device=status_device)
        intra.broadcast_(status, LEADER, state.traffic)
        failed, non_finite, leader_compressed = state.worker.runtime.to_list(status)
        if failed:
            received: list = [None]
            leader = dist.get_global_rank(intra.process_group, LEADER)
            dist.broadcast_object_list(received, src=leader, group=intra.process_group)
            kind, _, text = str(received[0]).partition(": ")
            error_type = ValueError if kind == "ValueError" else RuntimeError
            raise error_type(f"{text} (raised by this node's leader, rank {leader})")
        if not state.lifecycle.in_warmup(step):
            state.lifecycle.mark_compressed()
        if leader_compressed:  # what crossed between nodes decides whether the step was dense
            state.traffic.step_sent_compressed = True
        if non_finite and state.lifecycle.finite:
            state.lifecycle.mark_non_finite()
            level = logging.WARNING if state.observer is not None else logging.INFO
            logger.log(level, "gcomp: step %d is skipped on every rank: non-finite values in this node's sum or on the wire", step)
    intra.broadcast_(buffer, LEADER, state.traffic)
    return buffer


def _failure_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
