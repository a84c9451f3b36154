"""Bytes accounting: what every hook hands to the network, per step and per layer.

Definitions used everywhere in gcomp (and in ``state.stats()``):

- ``bytes_sent``: bytes this rank hands to collectives (an allreduce of N bytes counts N; an
  allgather counts this rank's own message once).
- ``bytes_received``: bytes the collectives hand back that carry other ranks' data (an allreduce of
  N bytes counts N; an allgather counts the other ranks' messages, ``(world - 1) * message``).
- ``bytes_uncompressed``: what a dense allreduce of the same buckets in their own dtype would hand
  to the collective, counted on every step (warm-up steps included), so
  ``bytes_uncompressed / bytes_sent`` is the compression ratio seen by the user.

The wire itself carries more (a ring allreduce sends about ``2 (W-1)/W`` times its payload, TCP
and gloo add headers); ``benchmarks/`` reads the network interface to measure that.

- ``links``: the same three collective counters (``bytes_sent``, ``bytes_received``,
  ``collectives``) by kind of link: ``flat`` (collectives over all ranks), or, on the hierarchical
  path, ``intra_node`` (the dense reduce and broadcast inside a node) and ``inter_node`` (the
  compressed exchange among node leaders: what crosses the slow link).

- ``seconds``: host time spent per phase of the reductions (``compress``, ``collective``,
  ``decompress``; the adaptive controller's ``profile`` and ``decide``), each also a ``torch.profiler`` range named ``gcomp.<phase>``. On CUDA
  the phases end with a host read of the device, so their sum is the wall time of the
  communication thread; the split between them is approximate where kernels run asynchronously.

Nothing here touches the numerics: the hooks only add numbers to these counters.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import torch

PHASES: tuple[str, ...] = ("compress", "collective", "decompress", "profile", "decide")


@dataclass
class LayerTraffic:
    """Cumulative traffic attributed to one parameter (one "layer")."""

    numel: int = 0
    shape: tuple[int, ...] = ()
    setting: str = "dense"  # e.g. "rank=4", "density=0.01", "dense", "fp16"
    bytes_sent: int = 0
    bytes_uncompressed: int = 0


@dataclass
class TrafficStats:
    """Cumulative counters of one hook state. Plain values only, so it checkpoints as-is."""

    steps: int = 0
    compressed_steps: int = 0  # sync steps after the warm-up (the adaptive controllers count these)
    # Sync steps in which no layer was sent smaller than dense: the warm-up, EF21's dense start, a
    # dense choice of "auto". Each costs a full step of plain DDP's bytes, so a few of them weigh
    # on the whole run's compression_ratio.
    dense_steps: int = 0
    skipped_steps: int = 0  # steps whose gradients were non-finite (state left untouched)
    model_group_steps: int = 0  # dense steps run as DDP's own allreduce, off the communication thread
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_uncompressed: int = 0
    collectives: int = 0
    layers: dict[str, LayerTraffic] = field(default_factory=dict)
    links: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {phase: 0.0 for phase in PHASES})

    @staticmethod
    @contextmanager
    def timed(traffic: Optional["TrafficStats"], phase: str) -> Iterator[None]:
        """A ``gcomp.<phase>`` profiler range whose host time is added to ``traffic.seconds``
        (when ``traffic`` is given; checks and decisions pass None and are not counted)."""
        start = time.perf_counter()
        with torch.profiler.record_function(f"gcomp.{phase}"):
            yield
        if traffic is not None:
            traffic.seconds[phase] = traffic.seconds.get(phase, 0.0) + time.perf_counter() - start

    def __post_init__(self) -> None:
        self.step_sent_compressed = False  # this step so far (not a counter: not checkpointed)

    def end_step(self) -> None:
        """Count the step that ends as dense unless some layer of it was sent compressed."""
        if not self.step_sent_compressed:
            self.dense_steps += 1
        self.step_sent_compressed = False

    def record_collective(self, sent: int, received: int, link: str = "flat") -> None:
        self.collectives += 1
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        counters = self.links.setdefault(link, {"bytes_sent": 0, "bytes_received": 0, "collectives": 0})
        counters["bytes_sent"] += int(sent)
        counters["bytes_received"] += int(received)
        counters["collectives"] += 1

    def record_layer(self, name: str, shape: tuple[int, ...], setting: str, sent: int, uncompressed: int) -> None:
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = LayerTraffic()
        numel = 1
        for size in shape:
            numel *= size
        layer.numel = numel
        layer.shape = tuple(shape)
        layer.setting = setting
        layer.bytes_sent += int(sent)
        layer.bytes_uncompressed += int(uncompressed)
        if sent < uncompressed:
            self.step_sent_compressed = True

    def summary(self) -> dict[str, Any]:
        """The dict returned by ``state.stats()``."""
        out = asdict(self)
        # None, not 1.0, when nothing was reduced: "no step ran" must not read as "no compression".
        out["compression_ratio"] = self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else None
        return out

    def state_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = {name: {**asdict(layer), "shape": list(layer.shape)} for name, layer in self.layers.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "compressed_steps", "skipped_steps", "model_group_steps", "bytes_sent", "bytes_received", "bytes_uncompressed", "collectives"):
            setattr(self, key, int(state.get(key, 0)))
        # Checkpoints written before dense_steps was counted: their warm-up steps.
        self.dense_steps = int(state.get("dense_steps", self.steps - self.compressed_steps))
        self.links = {
            str(link): {key: int(counters.get(key, 0)) for key in ("bytes_sent", "bytes_received", "collectives")}
            for link, counters in state.get("links", {}).items()
        }
        self.seconds = {phase: 0.0 for phase in PHASES}
        self.seconds.update({phase: float(value) for phase, value in state.get("seconds", {}).items()})
        self.layers = {
            name: LayerTraffic(
                numel=int(layer["numel"]),
                shape=tuple(int(s) for s in layer["shape"]),
                setting=str(layer["setting"]),
                bytes_sent=int(layer["bytes_sent"]),
                bytes_uncompressed=int(layer["bytes_uncompressed"]),
            )
            for name, layer in state.get("layers", {}).items()
        }
