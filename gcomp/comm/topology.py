"""Which ranks share a node, and the process groups of the hierarchical path.

A real cluster joins the GPUs of one node by a fast link (NVLink, PCIe) and the nodes by a slower
one. Compressing every rank's gradient and exchanging it with every other rank sends the
compressed bytes across the slow link several times over (a ring allreduce over ``W`` ranks sends
``2 (W - 1) / W`` times its payload over each link it crosses; an allgather ``W - 1`` messages).
The hierarchical path instead sums densely inside each node, lets one *leader* per node run the
codec with the other leaders, and broadcasts the result inside the node: the slow link carries
one compressed exchange among ``nodes`` parties.

Why leaders and not a shard of the layers per local rank: both put the same bytes on the
inter-node link (every node's share of the exchange is its whole compressed payload either way);
sharding spreads the codec's compute and would use several NICs per node, but needs one reduce and
one broadcast per shard, splits each bucket's layers by owner (DDP regroups buckets after the first
step, so ownership would move) and keeps state on every rank. With one leader the codec, its state
and its agreement checks are exactly the flat path's, over a smaller group.

Which rank is on which node is not guessed from one rank's environment: every rank sends one row
``(placement known, node key, option, adaptive controller)`` through one allgather at its first
hook call, and every rank decides from the same gathered rows, so all ranks take the same path or
all raise the same error. The node key is torchrun's ``GROUP_RANK`` (the node rank; all network
namespaces of an emulated cluster share one hostname, so the hostname is only the fallback), and a
placement is *known* when the launcher set ``LOCAL_WORLD_SIZE``.

The groups (one per node, one of the leaders) are created once, on every rank, in the same order,
at the first hook call, next to :meth:`Transport.ensure_group`.
"""
from __future__ import annotations

import logging
import os
import socket
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .device import DeviceRuntime
from .transport import Transport

logger = logging.getLogger(__name__)

HierarchicalOption = Union[str, bool]
_OPTION_CODES: dict[Any, int] = {"auto": 0, False: 1, True: 2}
LEADER = 0  # the leader's rank inside its node's group: the node's lowest rank


def check_hierarchical_option(value: Any) -> HierarchicalOption:
    """``"auto"``, ``True`` or ``False``, else a ``ValueError`` that says so."""
    if value is True or value is False or value == "auto" and isinstance(value, str):
        return value
    raise ValueError(f"hierarchical must be 'auto', True or False; got {value!r}")


@dataclass(frozen=True)
class Placement:
    """What one rank says about itself: one row of the topology allgather."""

    known: bool  # the launcher told this rank its node (LOCAL_WORLD_SIZE is set)
    node_key: int
    option: int  # code of the hierarchical option (see _OPTION_CODES)
    adaptive: bool  # an adaptive controller is attached (the hierarchical path has none)

    def encode(self) -> list[int]:
        return [int(self.known), self.node_key, self.option, int(self.adaptive)]

    @classmethod
    def decode(cls, row: Sequence[Any]) -> "Placement":
        return cls(known=bool(int(row[0])), node_key=int(row[1]), option=int(row[2]), adaptive=bool(int(row[3])))


def local_placement(option: HierarchicalOption, adaptive: bool) -> Placement:
    """This rank's row, from the launcher's environment (torchrun: ``LOCAL_WORLD_SIZE``,
    ``GROUP_RANK``)."""
    known = "LOCAL_WORLD_SIZE" in os.environ
    group_rank = os.environ.get("GROUP_RANK")
    if group_rank is not None and group_rank.strip().lstrip("-").isdigit():
        node_key = int(group_rank)
    else:  # keys from hostnames live above every node rank
        node_key = (1 << 32) + zlib.crc32(socket.gethostname().encode("utf-8"))
    return Placement(known=known, node_key=node_key, option=_OPTION_CODES[option], adaptive=adaptive)


@dataclass(frozen=True)
class Topology:
    """Ranks of the transport's group by node: nodes ordered by their lowest rank, ranks inside a
    node ascending (the first is the node's leader)."""

    nodes: tuple[tuple[int, ...], ...]

    @property
    def processes_per_node(self) -> int:
        return len(self.nodes[0])

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(node[0] for node in self.nodes)

    def node_of(self, rank: int) -> int:
        return next(index for index, node in enumerate(self.nodes) if rank in node)

    def describe(self) -> dict[str, Any]:
        return {"nodes": len(self.nodes), "processes_per_node": self.processes_per_node}


def plan_topology(placements: Sequence[Placement]) -> tuple[Optional[Topology], str]:
    """Decide the path from every rank's row (a pure function: the same rows give the same
    answer on every rank). Returns the topology for the hierarchical path, or ``None`` and why
    the flat path runs. Raises ``ValueError`` when the ranks disagree on the option, or when
    ``hierarchical=True`` asks for what this topology cannot do."""
    options = {placement.option for placement in placements}
    if len(options) > 1:
        names = {code: name for name, code in _OPTION_CODES.items()}
        seen = [names.get(p.option, p.option) for p in placements]
        raise ValueError(f"gcomp: ranks disagree on the hierarchical option: {seen} (by rank). Use the same value on every rank.")
    option = next(iter(options))
    forced = option == _OPTION_CODES[True]

    def flat(reason: str) -> tuple[None, str]:
        if forced:
            raise ValueError(f"gcomp: hierarchical=True, but {reason}; use hierarchical='auto' or False here")
        return None, reason

    if option == _OPTION_CODES[False]:
        return None, "hierarchical=False"
    if len(placements) < 2:
        return flat("there is a single process")
    if not all(placement.known for placement in placements):
        unknown = [rank for rank, placement in enumerate(placements) if not placement.known]
        return flat(f"the node of ranks {unknown[:8]} is unknown (LOCAL_WORLD_SIZE not set by the launcher)")
    by_key: dict[int, list[int]] = {}
    for rank, placement in enumerate(placements):
        by_key.setdefault(placement.node_key, []).append(rank)
    nodes = tuple(tuple(ranks) for ranks in sorted(by_key.values(), key=lambda ranks: ranks[0]))
    sizes = [len(node) for node in nodes]
    if len(nodes) == 1:
        return flat(f"all {sizes[0]} processes are on one node")
    if len(set(sizes)) > 1:
        return flat(f"the nodes hold different numbers of processes ({sizes})")
    if sizes[0] == 1:
        return flat(f"each of the {len(nodes)} nodes runs one process")
    if any(placement.adaptive for placement in placements):
        return flat("the adaptive controller runs on the flat path only")
    return Topology(nodes), ""


@dataclass
class NodeGroups:
    """This rank's part of the hierarchical path: its node's group and, on leaders, the leaders'."""

    topology: Topology
    node: int
    intra: Transport  # this node's ranks; the leader is group rank LEADER
    leaders: Optional[Transport]  # the node leaders (None on the other ranks)

    @property
    def is_leader(self) -> bool:
        return self.leaders is not None

    def describe(self) -> dict[str, Any]:
        return {**self.topology.describe(), "node": self.node, "leader": self.is_leader}


def discover(
    transport: Transport,
    runtime: DeviceRuntime,
    device: torch.device,
    option: HierarchicalOption,
    adaptive: bool,
) -> tuple[Optional[NodeGroups], str]:
    """Find the topology and create the groups of the hierarchical path, or decide for the flat
    path (and say why). Collective: call on every rank at the same point (the first hook call, not
    on the communication thread), after ``transport.ensure_group()``."""
    if transport.world_size == 1:  # the same on every rank: nothing to agree on
        return None, "there is a single process"
    # Even with hierarchical=False: the option itself is compared in the rows.
    where = transport.small_tensor_device(device)
    mine = torch.tensor(local_placement(option, adaptive).encode(), device=where, dtype=torch.int64)
    gathered = transport.allgather(mine, traffic=None)
    rows = runtime.to_list(gathered.flatten())
    width = mine.numel()
    placements = [Placement.decode(rows[rank * width:(rank + 1) * width]) for rank in range(transport.world_size)]
    topology, reason = plan_topology(placements)
    if topology is None:
        return None, reason
    global_ranks = dist.get_process_group_ranks(transport.process_group)
    backend = transport.backend
    me = transport.rank
    intra: Optional[Transport] = None
    for node in topology.nodes:  # every rank creates every group, in the same order
        group = dist.new_group(ranks=[global_ranks[rank] for rank in node], backend=backend)
        if me in node:
            intra = Transport.on_group(group, link="intra_node")
    leaders = dist.new_group(ranks=[global_ranks[rank] for rank in topology.leaders], backend=backend)
    leader_transport = Transport.on_group(leaders, link="inter_node") if me in topology.leaders else None
    assert intra is not None
    return NodeGroups(topology=topology, node=topology.node_of(me), intra=intra, leaders=leader_transport), ""
