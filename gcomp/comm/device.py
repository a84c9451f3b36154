"""The one place where gcomp crosses the host/device boundary: host reads and CUDA streams.

Everything else in gcomp is device-agnostic tensor code: tensors are created on the bucket's
device (``new_empty``, ``*_like`` or an explicit ``device=``), and collectives take them where
they are. What cannot be written that way is here, in one small object:

- **host reads**: a codec must sometimes decide on the host (is this all-reduced sum finite? do
  all ranks hold the same checksum?). On CUDA each such read waits for the device, so gcomp does
  them on its communication thread, never on the autograd thread;
- **streams**: the gradients DDP hands over were written on the autograd thread's current stream.
  The communication thread runs a bucket's whole reduction on a side stream of its own that first
  waits for an event recorded on that producer stream, and completes a CUDA-aware
  ``torch.futures.Future`` *inside* the side stream, so the future records its own events there and
  DDP's reducer, which waits on the future, orders its copy-back after every kernel and collective
  of the reduction (the trap of a hook that runs on a side stream without telling its consumer);
- **futures**: ``torch.futures.Future(devices=[...])`` for CUDA buckets, a plain one on CPU.

Tests swap this object for one that serves fake CUDA tensors (``FakeTensorMode``), whose values
cannot be read, so the whole hook path runs on a device type other than the CPU without a GPU.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

import torch


class DeviceRuntime:
    """Host reads, stream order and futures for tensors on ``cuda`` or ``cpu`` devices."""

    def __init__(self) -> None:
        self._side_streams: dict[torch.device, Any] = {}

    # ------------------------------------------------------------------ host reads
    def all_finite(self, tensor: torch.Tensor) -> bool:
        """True when every entry of ``tensor`` is finite (one device-to-host read)."""
        if tensor.numel() == 0:
            return True
        # A float64 sum is finite iff every entry is (no finite float32/16 set overflows it), and
        # costs one pass instead of an elementwise isfinite plus a reduction.
        if tensor.is_floating_point():
            return math.isfinite(float(tensor.sum(dtype=torch.float64)))
        return True

    def to_list(self, tensor: torch.Tensor) -> list[Any]:
        """The values of a small tensor on the host (checksums, flags, error tables)."""
        return tensor.tolist()

    # ------------------------------------------------------------------ clocks
    def mark(self, device: torch.device) -> Any:
        """A point in time on ``device``'s current stream, for :meth:`seconds` (the time-aware
        choice times a few steps with these). CPU: the host clock. CUDA: a timing event recorded on
        the current stream, so nothing waits for the device here; the wait happens in
        :meth:`seconds`, once per measured step, off the autograd thread."""
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from mark ``start`` to mark ``end`` (waits until ``end`` has happened on CUDA)."""
        if isinstance(start, float) and isinstance(end, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    # ------------------------------------------------------------------ streams and futures
    def producer_event(self, device: torch.device) -> Optional[Any]:
        """Called on the autograd thread when DDP hands over a bucket: marks the point of the
        producer stream after which the bucket's gradients are complete (None on CPU)."""
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    @contextmanager
    def reduction_scope(self, device: torch.device, producer: Optional[Any]) -> Iterator[None]:
        """Run one bucket's reduction on the communication thread: on CUDA, on that device and on a
        side stream that waits for ``producer`` first; a no-op on CPU."""
        if device.type != "cuda":
            yield
            return
        with torch.cuda.device(device):
            stream = self._side_streams.get(device)
            if stream is None:
                stream = self._side_streams[device] = torch.cuda.Stream(device)
            if producer is not None:
                stream.wait_event(producer)
            with torch.cuda.stream(stream):
                yield

    def new_future(self, device: torch.device) -> torch.futures.Future:
        """A future DDP can wait on: CUDA-aware for CUDA buckets (it records events on the stream
        current when ``set_result`` runs, which is the side stream of :meth:`reduction_scope`)."""
        if device.type == "cuda":
            return torch.futures.Future(devices=[device])
        return torch.futures.Future()

    def device_scope(self, device: torch.device) -> Any:
        """Make ``device`` current on this thread (the communication thread starts on cuda:0)."""
        return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
