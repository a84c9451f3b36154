"""What a list of collectives costs per rank: bytes (as gcomp counts them, and on the wire) and time.

A latency-bandwidth ("alpha-beta") model: a message of ``n`` bytes between two ranks takes
``latency + n / rate`` seconds. Each collective's time is that of a textbook algorithm, with ``W``
ranks, ``n`` the payload (the tensor of an allreduce or a broadcast, one rank's message of an
allgather):

============  ==========  ===============================  =====================================
collective    algorithm   wire bytes sent per rank          seconds
============  ==========  ===============================  =====================================
allreduce     ring        ``2 (W-1)/W n``                   ``2 (W-1) latency + 2 (W-1)/W n / rate``
allgather     ring        ``(W-1) n``                       ``(W-1) (latency + n / rate)``
broadcast     tree        ``(W-1)/W n`` (mean over ranks)   ``ceil(log2 W) (latency + n / rate)``
broadcast     ring        ``(W-1)/W n`` (mean over ranks)   ``(W-1) latency + n / rate`` (pipelined)
============  ==========  ===============================  =====================================

The *counted* bytes are what :class:`~gcomp.metrics.TrafficStats` adds for the same collective
(``Transport``): an allreduce counts ``n`` sent and ``n`` received; an allgather ``n`` sent and
``(W-1) n`` received; a broadcast ``n`` sent by its root and ``n`` received by every other rank,
given here as the mean over ranks (``n / W`` sent, ``(W-1)/W n`` received), which is every rank's
own mean when the root rotates over the ranks. Counted bytes are exact (the tests compare them with
``stats()`` byte for byte); seconds are a model: it ignores congestion, protocol headers (TCP and
gloo add about 7-15 %, RESULTS §5) and overlap with computation.

This module knows sizes, not algorithms of compression: a hook states which collectives of which
sizes it issues (e.g. :func:`gcomp.hooks.topk.topk_step_collectives`), this module prices them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

COLLECTIVE_KINDS: tuple[str, ...] = ("allreduce", "allgather", "broadcast")
ALGORITHMS: dict[str, tuple[str, ...]] = {"allreduce": ("ring",), "allgather": ("ring",), "broadcast": ("tree", "ring")}


@dataclass(frozen=True)
class Link:
    """One rank's connection: ``rate`` in bytes per second (each direction), ``latency`` in seconds
    per message. E.g. 10 Gbit/s Ethernet with 20 us per message: ``Link(1.25e9, 20e-6)``."""

    rate: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"link rate must be a finite number of bytes per second > 0; got {self.rate!r}")
        if not (isinstance(self.latency, (int, float)) and math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"link latency must be a finite number of seconds >= 0; got {self.latency!r}")


@dataclass(frozen=True)
class Collective:
    """One collective a step issues: its kind and payload bytes (an allgather: one rank's message)."""

    kind: str
    nbytes: int

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVE_KINDS:
            raise ValueError(f"collective kind must be one of {list(COLLECTIVE_KINDS)}; got {self.kind!r}")
        if self.nbytes < 0:
            raise ValueError(f"collective payload must be >= 0 bytes; got {self.nbytes}")


@dataclass(frozen=True)
class CommunicationCost:
    """Per rank: counted bytes (``stats()``'s ``bytes_sent`` / ``bytes_received``), wire bytes sent
    under the chosen algorithms, modelled seconds, and the number of collectives."""

    sent: float = 0.0
    received: float = 0.0
    wire_sent: float = 0.0
    seconds: float = 0.0
    collectives: int = 0

    def __add__(self, other: "CommunicationCost") -> "CommunicationCost":
        return CommunicationCost(
            self.sent + other.sent,
            self.received + other.received,
            self.wire_sent + other.wire_sent,
            self.seconds + other.seconds,
            self.collectives + other.collectives,
        )


def collective_cost(collective: Collective, world: int, link: Link, algorithm: str | None = None) -> CommunicationCost:
    """The cost of one collective over ``world`` ranks (see the module docstring's table);
    ``algorithm`` ``None`` is the first of :data:`ALGORITHMS` for its kind (broadcast: ``"tree"``)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1; got {world!r}")
    kind, n = collective.kind, float(collective.nbytes)
    algorithm = algorithm or ALGORITHMS[kind][0]
    if algorithm not in ALGORITHMS[kind]:
        raise ValueError(f"{kind} algorithm must be one of {list(ALGORITHMS[kind])}; got {algorithm!r}")
    if world == 1:  # nothing crosses a link (gcomp's counters still count the payload)
        received = 0.0 if kind != "allreduce" else n
        sent = n
        return CommunicationCost(sent=sent, received=received, collectives=1)
    peers = world - 1
    if kind == "allreduce":
        wire = 2 * peers / world * n
        return CommunicationCost(n, n, wire, 2 * peers * link.latency + wire / link.rate, 1)
    if kind == "allgather":
        return CommunicationCost(n, peers * n, peers * n, peers * (link.latency + n / link.rate), 1)
    wire = peers / world * n
    if algorithm == "tree":
        seconds = math.ceil(math.log2(world)) * (link.latency + n / link.rate)
    else:
        seconds = peers * link.latency + n / link.rate
    return CommunicationCost(n / world, peers / world * n, wire, seconds, 1)


def communication_cost(
    collectives: Iterable[Collective], world: int, link: Link, algorithms: dict[str, str] | None = None
) -> CommunicationCost:
    """The summed cost of ``collectives`` issued one after another (no overlap between them);
    ``algorithms`` maps a kind to its algorithm (``{"broadcast": "ring"}``)."""
    algorithms = algorithms or {}
    total = CommunicationCost()
    for collective in collectives:
        total = total + collective_cost(collective, world, link, algorithms.get(collective.kind))
    return total
