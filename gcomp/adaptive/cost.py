"""The time-aware choice's cost model: how long a step takes when given layers are sent dense and
the others compressed, predicted from a few measured numbers. Pure Python (no torch), so it can be
tested on synthetic measurements and gives the same answer on every rank from the same inputs.

The model, every time in seconds:

- **Link.** A collective costs ``latency + wire bytes / rate``. An allreduce of ``B`` bytes over
  ``W`` ranks moves ``2 (W - 1) / W * B`` bytes per rank (a ring); an allgather of ``m`` bytes per
  rank moves ``(W - 1) * m``. ``latency`` comes from a probe of tiny allreduces, ``rate`` from the
  dense warm-up allreduces (:func:`fit_link`).
- **Compute.** A compressed layer costs ``per_layer + per_element * numel`` on the communication
  thread (compression, decompression, error feedback; ``per_layer``: launches and Python work),
  two constants per method, fitted from a few compressed steps as what the link model does not
  explain of their reductions (:func:`fit_compute`). A dense layer costs nothing beyond its bytes.
- **Overlap.** Bucket ``i`` is handed over ``ready[i]`` seconds after the step's first bucket (the
  measured backward schedule). One communication thread reduces the buckets in order, so bucket
  ``i`` is done at ``f_i = max(f_{i-1}, ready[i]) + c_i``. Backward hides everything up to the
  last bucket's hand-over; the rest is *exposed*: ``f_N - ready[N]``. A step takes
  ``base + exposed``, where ``base`` (forward, backward, optimizer) is the measured step time of the
  dense steps minus their measured exposed communication.

What it ignores, knowingly: the compute of compression competing with backward for the same cores
(CPU) or SMs (GPU), so compression inside the backward window is taken as free; per-layer launch
overheads that are not proportional to the number of compressed layers; a rate that depends on the message size (one rate, fitted on
the large dense allreduces, also prices the small compressed messages); EF21's one dense
initialisation step; accuracy: the model only knows time, so among settings predicted within a
tolerance of the fastest it prefers the one with more dense layers (exact gradients).

Per-layer seconds for a DP over settings (L-GreCo with time next to bytes) come from
:meth:`CostModel.layer_seconds`: the same link and compute terms without the overlap, which is a
property of whole buckets, not of layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import AbstractSet, Optional, Sequence


@dataclass(frozen=True)
class MeasuredLink:
    """The link as this choice measures it: ``latency`` is one fitted constant per collective
    (from a probe of tiny allreduces), unlike :class:`gcomp.comm.cost.Link`, which models textbook
    algorithms with a latency per message to project other world sizes. A collective costs
    ``latency + wire bytes / rate`` (``rate``: bytes per second and rank, ``math.inf`` for a link
    that costs only its latency)."""

    latency: float
    rate: float
    world: int

    def __post_init__(self) -> None:
        if not (self.latency >= 0 and self.rate > 0 and self.world >= 1):
            raise ValueError(f"a link needs latency >= 0, rate > 0 and world >= 1; got {self}")

    def allreduce(self, nbytes: float) -> float:
        return self.latency + 2 * (self.world - 1) / self.world * nbytes / self.rate

    def allgather(self, nbytes_per_rank: float) -> float:
        return self.latency + (self.world - 1) * nbytes_per_rank / self.rate

    def collective(self, kind: str, nbytes: float) -> float:
        return self.allreduce(nbytes) if kind == "allreduce" else self.allgather(nbytes)


@dataclass(frozen=True)
class LayerCost:
    """What one layer adds to its bucket's collectives, dense or compressed.

    ``first_bytes`` go into the bucket's first collective (always an allreduce, also carrying the
    dense layers, unless the bucket sends them apart), ``second_bytes`` into its second one,
    issued only when some layer of the bucket is compressed (PowerSGD: P, then Q; top-k and
    quantize: nothing, then the message).
    """

    name: str
    numel: int
    dense_bytes: int
    compressible: bool = False
    first_bytes: int = 0
    second_bytes: int = 0


@dataclass(frozen=True)
class BucketCost:
    """One bucket under one method: its layers, the bytes its first allreduce always carries
    beyond them (a health flag), the kind of its second collective, and whether the compressed
    layers' first bytes travel in an allreduce of their own (``first_apart``: PowerSGD's P in a
    narrower dtype than the dense layers; the dense allreduce is then skipped when empty)."""

    layers: tuple[LayerCost, ...]
    first_extra_bytes: int = 0
    second: str = "allreduce"
    first_apart: bool = False

    def collectives(self, dense: AbstractSet[str]) -> list[tuple[str, int]]:
        """The bucket's collectives (kind, bytes per rank) when the layers in ``dense`` (and those
        the method cannot compress) are sent dense and the others compressed."""
        first, apart, second, compressed = self.first_extra_bytes, 0, 0, False
        for layer in self.layers:
            if layer.compressible and layer.name not in dense:
                if self.first_apart:
                    apart += layer.first_bytes
                else:
                    first += layer.first_bytes
                second += layer.second_bytes
                compressed = True
            else:
                first += layer.dense_bytes
        out = [("allreduce", first)] if first or not (compressed and self.first_apart) else []
        if compressed:
            if self.first_apart:
                out.append(("allreduce", apart))
            out.append((self.second, second))
        return out

    def compressed_work(self, dense: AbstractSet[str]) -> tuple[int, int]:
        """(layers, elements) compressed when the layers in ``dense`` are sent dense."""
        numels = [layer.numel for layer in self.layers if layer.compressible and layer.name not in dense]
        return len(numels), sum(numels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


@dataclass(frozen=True)
class CostModel:
    """Predicted step time of one method on this run's link and backward schedule."""

    link: MeasuredLink
    ready: tuple[float, ...]  # seconds from the step's first bucket to each bucket's hand-over
    base: float  # step seconds that are not exposed communication
    per_element: float = 0.0  # compute seconds per compressed element
    per_layer: float = 0.0  # compute seconds per compressed layer

    def bucket_seconds(self, bucket: BucketCost, dense: AbstractSet[str]) -> float:
        comm = sum(self.link.collective(kind, nbytes) for kind, nbytes in bucket.collectives(dense))
        layers, numel = bucket.compressed_work(dense)
        return comm + self.per_layer * layers + self.per_element * numel

    def exposed(self, bucket_seconds: Sequence[float]) -> float:
        """Communication not hidden by backward, for per-bucket reduction times in bucket order."""
        if len(bucket_seconds) != len(self.ready):
            raise ValueError(f"{len(bucket_seconds)} bucket times for {len(self.ready)} measured buckets")
        finished = 0.0
        for ready, seconds in zip(self.ready, bucket_seconds):
            finished = max(finished, ready) + seconds
        return max(0.0, finished - (self.ready[-1] if self.ready else 0.0))

    def step_seconds(self, buckets: Sequence[BucketCost], dense: AbstractSet[str]) -> float:
        return self.base + self.exposed([self.bucket_seconds(bucket, dense) for bucket in buckets])

    def layer_seconds(self, layer: LayerCost, compressed: bool, second_kind: str = "allreduce") -> float:
        """One layer's own seconds without latency or overlap: its bytes on the link, plus its
        compute when compressed (for logs, and as a per-layer cost for a DP over settings)."""
        if not (compressed and layer.compressible):
            return self.link.allreduce(layer.dense_bytes) - self.link.latency
        return (
            self.link.allreduce(layer.first_bytes) - self.link.latency
            + self.link.collective(second_kind, layer.second_bytes) - self.link.latency
            + self.per_layer + self.per_element * layer.numel
        )


@dataclass(frozen=True)
class Choice:
    """The dense layers chosen for one method and the predicted step seconds."""

    dense: frozenset[str]
    step_seconds: float
    all_dense_seconds: float
    all_compressed_seconds: float
    compressed: tuple[str, ...] = field(default=())  # in the order the greedy search added them


def choose_dense(model: CostModel, buckets: Sequence[BucketCost], tolerance: float = 0.02) -> Choice:
    """Which layers to send dense so that the predicted step is (nearly) the fastest.

    Starts from every layer dense and compresses, one layer at a time, the layer that lowers the
    predicted step time most (within a bucket the one with the largest own saving; across
    buckets the overlap decides: compressing a layer hidden behind backward gains nothing). The
    answer is the shortest prefix of that sequence whose predicted step is within ``tolerance``
    (a fraction) of the fastest one seen, so a layer is compressed only where it pays.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    everything = frozenset(name for bucket in buckets for name in bucket.names)
    queues: list[list[LayerCost]] = []
    for bucket in buckets:
        own = [
            (model.layer_seconds(layer, False) - model.layer_seconds(layer, True, bucket.second), layer)
            for layer in bucket.layers if layer.compressible
        ]
        # Layers that save nothing on their own are never compressed; stable order for ties.
        queues.append([layer for saving, layer in sorted(own, key=lambda item: -item[0]) if saving > 0])
    dense = set(everything)
    costs = [model.bucket_seconds(bucket, dense) for bucket in buckets]
    trajectory: list[tuple[float, tuple[str, ...]]] = [(model.base + model.exposed(costs) if buckets else model.base, ())]
    order: list[str] = []
    while any(queues):
        best: Optional[tuple[float, int, float]] = None
        for index, queue in enumerate(queues):
            if not queue:
                continue
            dense.discard(queue[0].name)
            trial = model.bucket_seconds(buckets[index], dense)
            dense.add(queue[0].name)
            step = model.base + model.exposed(costs[:index] + [trial] + costs[index + 1:])
            if best is None or step < best[0]:
                best = (step, index, trial)
        assert best is not None
        step, index, trial = best
        layer = queues[index].pop(0)
        dense.discard(layer.name)
        costs[index] = trial
        order.append(layer.name)
        trajectory.append((step, tuple(order)))
    fastest = min(step for step, _ in trajectory)
    chosen_step, chosen = next((step, names) for step, names in trajectory if step <= fastest * (1 + tolerance))
    return Choice(
        dense=everything - frozenset(chosen),
        step_seconds=chosen_step,
        all_dense_seconds=trajectory[0][0],
        all_compressed_seconds=trajectory[-1][0],
        compressed=chosen,
    )


def fit_link(latency: float, dense_jobs: Sequence[tuple[float, float]], world: int) -> MeasuredLink:
    """The link from a latency probe and dense allreduces ``(bytes, seconds)``: the rate that
    explains their seconds beyond latency. Allreduces no slower than the latency give an
    infinitely fast link (only latency counts)."""
    latency = max(0.0, latency)
    wire = sum(2 * (world - 1) / world * nbytes for nbytes, _ in dense_jobs)
    beyond = sum(max(0.0, seconds - latency) for _, seconds in dense_jobs)
    rate = wire / beyond if beyond > 0 and wire > 0 else math.inf
    return MeasuredLink(latency=latency, rate=rate, world=world)


def fit_compute(link: MeasuredLink, jobs: Sequence[tuple[BucketCost, float]], dense: AbstractSet[str] = frozenset()) -> tuple[float, float]:
    """``(per_layer, per_element)`` compute seconds, from compressed reductions ``(bucket,
    seconds)``: what the link model does not explain of them. A least-squares fit of both terms
    (both >= 0) when at least three buckets with different layer sizes were measured, else all of it
    per element (the total is always matched: the sum over buckets of the unexplained seconds)."""
    rows = []
    for bucket, seconds in jobs:
        comm = sum(link.collective(kind, nbytes) for kind, nbytes in bucket.collectives(dense))
        layers, numel = bucket.compressed_work(dense)
        if layers:
            rows.append((float(layers), float(numel), max(0.0, seconds - comm)))
    total_numel = sum(numel for _, numel, _ in rows)
    proportional = (0.0, sum(u for _, _, u in rows) / total_numel if total_numel > 0 else 0.0)
    if len(rows) < 3:
        return proportional
    s_ll = sum(l * l for l, _, _ in rows)
    s_ln = sum(l * n for l, n, _ in rows)
    s_nn = sum(n * n for _, n, _ in rows)
    s_lu = sum(l * u for l, _, u in rows)
    s_nu = sum(n * u for _, n, u in rows)
    determinant = s_ll * s_nn - s_ln * s_ln
    if determinant <= 1e-9 * s_ll * s_nn:
        return proportional
    per_layer = (s_lu * s_nn - s_nu * s_ln) / determinant
    per_element = (s_nu * s_ll - s_lu * s_ln) / determinant
    return (per_layer, per_element) if per_layer >= 0 and per_element >= 0 else proportional
