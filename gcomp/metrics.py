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

Nothing here touches the numerics: the hooks only add numbers to these counters.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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
    compressed_steps: int = 0
    skipped_steps: int = 0  # steps whose gradients were non-finite (state left untouched)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_uncompressed: int = 0
    collectives: int = 0
    layers: dict[str, LayerTraffic] = field(default_factory=dict)

    def record_collective(self, sent: int, received: int) -> None:
        self.collectives += 1
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)

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

    def summary(self) -> dict[str, Any]:
        """The dict returned by ``state.stats()``."""
        out = asdict(self)
        out["compression_ratio"] = self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0
        return out

    def state_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = {name: {**asdict(layer), "shape": list(layer.shape)} for name, layer in self.layers.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("steps", "compressed_steps", "skipped_steps", "bytes_sent", "bytes_received", "bytes_uncompressed", "collectives"):
            setattr(self, key, int(state.get(key, 0)))
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


class JsonLinesSink:
    """Appends one JSON object per call to a file: the simplest sink a plot script can read."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
