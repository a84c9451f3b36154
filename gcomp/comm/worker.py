"""One communication thread per hook state, fed in bucket order.

Why a thread: a DDP comm hook must return a future without blocking backward, and a compressed
reduction needs several *dependent* collectives per bucket (PowerSGD: P, then Q). Launching the
second collective from a future callback is wrong on gloo: callbacks run on the process group's
worker threads, so ranks issue collectives in different orders and gloo pairs one bucket's data
with another's (or deadlocks when the callback waits). Here every bucket's whole reduction runs as
one job on a single thread, jobs run strictly in submission order, and submission order is DDP's
bucket order, which is the same on every rank. So every rank issues the same collectives in the
same order, while backward keeps computing the next buckets.

A failed job fails every later job too (fast, with the original cause), so a broken step never
leaves DDP waiting on a future that nobody completes.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import torch

Job = Callable[[], torch.Tensor]


class CommWorker:
    """A FIFO of reduction jobs executed by one daemon thread; each job completes one future."""

    def __init__(self, name: str = "gcomp-comm") -> None:
        self._name = name
        self._jobs: "queue.SimpleQueue[Optional[tuple[Job, torch.futures.Future]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> torch.futures.Future:
        """Queue ``job``; the returned future gets its result (or its exception)."""
        future: torch.futures.Future = torch.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put((job, future))
        return future

    def run_now(self, job: Job) -> torch.Tensor:
        """Run ``job`` in order with the queued ones and wait for its result (for checks and
        controller decisions that must happen between steps, on every rank alike)."""
        return self.submit(job).wait()

    @property
    def failure(self) -> Optional[BaseException]:
        return self._failure

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
            job, future = item
            if self._failure is not None:
                future.set_exception(
                    RuntimeError(f"gcomp: an earlier communication job failed, so this one was not run: {self._failure!r}")
                )
                continue
            try:
                result = job()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting DDP reducer
                self._failure = error
                future.set_exception(error)
                continue
            future.set_result(result)
