"""The life of one sync step, as the hooks see it.

DDP calls the hook once per bucket; the bucket with ``is_last()`` ends the step. A step's fate is
decided only at its end: if any bucket was non-finite on any rank (every rank sees the same
all-reduced data, so every rank decides alike), all state updates the codecs staged during the
step are dropped, so ``GradScaler`` can skip the step and nothing of it remains in error buffers,
estimates or warm-start factors. Counters count sync steps: ``no_sync`` micro-steps never reach
the hook.
"""
from __future__ import annotations

from typing import Sequence

from .store import LayerStore
from ..metrics import TrafficStats


class StepLifecycle:
    """Step counter, warm-up and the end-of-step commit-or-drop decision."""

    def __init__(self, warmup_steps: int) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (sync steps of plain allreduce); got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.started = 0  # steps whose last bucket DDP has handed over (autograd thread)
        self._finite = True  # the rest: communication thread, during a step
        self._compressed = False

    def begin_bucket(self, is_last: bool) -> int:
        """Called on the autograd thread for each bucket; returns the bucket's step index."""
        step = self.started
        if is_last:
            self.started += 1
        return step

    @property
    def finite(self) -> bool:
        """No bucket of the current step was non-finite so far (communication thread)."""
        return self._finite

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def mark_non_finite(self) -> None:
        """A codec saw non-finite all-reduced data: the whole step's updates will be dropped."""
        self._finite = False

    def mark_compressed(self) -> None:
        self._compressed = True

    def finish(self, stores: Sequence[LayerStore], traffic: TrafficStats) -> None:
        """End of step: commit or drop the staged updates of every store, count the step."""
        for store in stores:
            if self._finite:
                store.commit()
            else:
                store.drop()
        if not self._finite:
            traffic.skipped_steps += 1
        traffic.steps += 1
        traffic.end_step()
        if self._compressed:
            traffic.compressed_steps += 1
        self._finite = True
        self._compressed = False
