"""One communication thread per hook state, fed in bucket order.

Why a thread, on every backend:

- **gloo**: a compressed reduction needs several *dependent* collectives per bucket (PowerSGD: P,
  then Q). Launching the second from a future callback is wrong on gloo: callbacks run on the
  process group's worker threads, so ranks issue collectives in different orders and gloo pairs
  one bucket's data with another's (or deadlocks when the callback waits).
- **NCCL**: collectives launched from the hook would be issued in program order, but every codec
  also makes host decisions (is the all-reduced sum finite? do the ranks agree?), and on CUDA each
  of those waits for the device. On the autograd thread that wait would stall backward at every
  bucket; on this thread it only delays the bucket's own reduction while backward keeps queueing
  kernels.

Here every bucket's whole reduction runs as one job on a single thread, jobs run strictly in
submission order, and submission order is DDP's bucket order, the same on every rank. So every
rank issues the same collectives in the same order, while backward keeps computing the next
buckets. Stream order on CUDA is :class:`~gcomp.comm.device.DeviceRuntime`'s business.

A failed job fails every later job too (fast, with the original cause), so a broken step never
leaves DDP waiting on a future that nobody completes.

``inline=True`` runs each job at submission, on the caller's thread, and returns a completed
future: no overlap, but nothing crosses a thread (used by tests whose tensor mode is per thread).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, Union

import torch

from .device import DeviceRuntime

Job = Callable[[], torch.Tensor]
_Item = tuple[Job, torch.futures.Future, torch.device, Optional[Any]]


class CommWorker:
    """A FIFO of reduction jobs executed by one daemon thread; each job completes one future."""

    def __init__(self, name: str = "gcomp-comm", runtime: Optional[DeviceRuntime] = None, inline: bool = False) -> None:
        self._name = name
        self.runtime = runtime if runtime is not None else DeviceRuntime()
        self.inline = inline
        self._jobs: "queue.SimpleQueue[Union[_Item, threading.Event, None]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None
        self._lock = threading.Lock()

    def submit(self, job: Job, device: torch.device = torch.device("cpu")) -> torch.futures.Future:
        """Queue ``job`` (a reduction of tensors on ``device``); the returned future gets its
        result or its exception. Call on the thread that produced the tensors."""
        future = self.runtime.new_future(device)
        producer = self.runtime.producer_event(device)
        if self.inline:
            self._execute((job, future, device, producer))
            return future
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put((job, future, device, producer))
        return future

    def run_now(self, job: Job, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """Run ``job`` in order with the queued ones and wait for its result (for checks and
        controller decisions that must happen between steps, on every rank alike)."""
        return self.submit(job, device).wait()

    def drain(self) -> None:
        """Wait until every job queued so far has run (jobs queued by other jobs, such as a
        controller decision after a step's last bucket, included). Does nothing inline, on a
        closed worker, or when called from the communication thread itself; a job that failed
        was already reported to the DDP future that waited for it, so it is not raised again."""
        with self._lock:
            thread = self._thread
        if self.inline or thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        done = threading.Event()
        self._jobs.put(done)  # set by the thread when it reaches it, whether earlier jobs failed or not
        done.wait()

    def close(self) -> None:
        """Stop the thread after the queued jobs finish. Safe to call twice."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._execute(item)

    def _execute(self, item: _Item) -> None:
        job, future, device, producer = item
        if self._failure is not None:
            future.set_exception(
                RuntimeError(f"gcomp: an earlier communication job failed, so this one was not run: {self._failure!r}")
            )
            return
        try:
            with self.runtime.reduction_scope(device, producer):
                result = job()
                # Inside the scope: a CUDA-aware future records its events on the side stream.
                future.set_result(result)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting DDP reducer
            self._failure = error
            future.set_exception(error)
