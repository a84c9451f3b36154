"""What the time-aware choice measures of a step, and how the ranks' measurements become one.

Per measured step, from marks taken by the hook (:meth:`gcomp.comm.DeviceRuntime.mark`: the host
clock on CPU, timing events on CUDA, read only at the step's end on the communication thread):

- ``ready``: when backward handed each bucket over, after the step's first bucket (the window in
  which communication can hide behind backward);
- ``jobs``: how long each bucket's reduction ran on the communication thread (its collectives and,
  in compressed steps, its compression);
- ``exposed``: from the last bucket's hand-over to the end of its reduction (what DDP waited for);
- ``period``: from this step's first hand-over to the next step's (known one step later).

Ranks measure different numbers (their clocks, their data, who waits for whom inside a
collective), so before deciding every rank gathers every rank's summary and combines them alike
(:func:`combine`): the *slowest* rank's backward schedule and step time (everyone waits for it),
the *fastest* rank's reduction times and latency (a rank that reached a collective early also
measured its wait for the others, which is not the link's cost).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

from ..comm import DeviceRuntime
from ..hooks.layout import BucketLayout


@dataclass
class StepTiming:
    """One measured step (plain values: it is checkpointed)."""

    step: int
    fingerprints: tuple[int, ...]
    ready: tuple[float, ...]
    jobs: tuple[float, ...]
    exposed: float
    period: Optional[float] = None

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "StepTiming":
        return cls(
            step=int(saved["step"]), fingerprints=tuple(int(f) for f in saved["fingerprints"]),
            ready=tuple(float(r) for r in saved["ready"]), jobs=tuple(float(j) for j in saved["jobs"]),
            exposed=float(saved["exposed"]), period=None if saved.get("period") is None else float(saved["period"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fingerprints"], out["ready"], out["jobs"] = list(self.fingerprints), list(self.ready), list(self.jobs)
        return out


class StepClock:
    """Marks of the buckets of the step in progress, turned into a :class:`StepTiming` at its end.

    ``record_bucket`` runs on the communication thread in bucket order; so does ``finish_step``
    (queued behind the step's last bucket), so no lock is needed.
    """

    def __init__(self, runtime: DeviceRuntime) -> None:
        self.runtime = runtime
        self._marks: list[tuple[Any, Any, Any]] = []
        self._step: Optional[int] = None
        self._pending_layouts: list[BucketLayout] = []
        self.layouts: list[BucketLayout] = []  # of the last finished step (kept in memory only)
        self._previous_first: Optional[tuple[int, Any]] = None  # (step, first hand-over mark)

    def record_bucket(self, step: int, layout: BucketLayout, submitted: Any, started: Any, finished: Any) -> None:
        if step != self._step:
            self._step, self._marks, self._pending_layouts = step, [], []
        self._marks.append((submitted, started, finished))
        self._pending_layouts.append(layout)

    def finish_step(self, step: int, previous: Optional[StepTiming]) -> Optional[StepTiming]:
        """The timing of ``step`` (None if it was not measured), and the period of ``previous``
        (the step measured just before it) filled in."""
        if self._step != step or not self._marks:
            self._previous_first = None
            return None
        marks, seconds = self._marks, self.runtime.seconds
        first = marks[0][0]
        seconds(first, marks[-1][2])  # on CUDA: wait once for the step's last event; the others precede it
        timing = StepTiming(
            step=step,
            fingerprints=tuple(layout.fingerprint for layout in self._pending_layouts),
            ready=tuple(seconds(first, submitted) for submitted, _, _ in marks),
            jobs=tuple(seconds(started, finished) for _, started, finished in marks),
            exposed=max(0.0, seconds(marks[-1][0], marks[-1][2])),
        )
        if previous is not None and self._previous_first is not None and self._previous_first[0] == previous.step == step - 1:
            previous.period = seconds(self._previous_first[1], first)
        self._previous_first = (step, first)
        self.layouts = self._pending_layouts
        self._step, self._marks = None, []
        return timing


@dataclass
class LocalMeasurements:
    """One rank's summary of its measured steps (the numbers the decision combines over ranks);
    tests inject their own through :meth:`gcomp.adaptive.TimeAwareController.inject`."""

    latency: float  # seconds of a tiny allreduce
    base: float  # step seconds beyond exposed communication, dense steps
    ready: list[float]  # per bucket, dense steps
    dense_jobs: list[float]  # per bucket: seconds of its dense allreduce
    trial_jobs: dict[str, list[float]] = field(default_factory=dict)  # per method, per bucket

    def to_vector(self, methods: Sequence[str]) -> list[float]:
        out = [self.latency, self.base, *self.ready, *self.dense_jobs]
        for method in methods:
            out += self.trial_jobs[method]
        return out

    @classmethod
    def from_vector(cls, values: Sequence[float], buckets: int, methods: Sequence[str]) -> "LocalMeasurements":
        values = list(values)
        position = 2 + 2 * buckets
        trial = {}
        for method in methods:
            trial[method] = values[position : position + buckets]
            position += buckets
        return cls(values[0], values[1], values[2 : 2 + buckets], values[2 + buckets : 2 + 2 * buckets], trial)


def combine(rows: Sequence[LocalMeasurements]) -> LocalMeasurements:
    """Every rank's measurements as one (see the module docstring); the same on every rank when
    every rank combines the same gathered rows."""
    methods = list(rows[0].trial_jobs)

    def each(values: Sequence[Sequence[float]], pick: Any) -> list[float]:
        return [pick(column) for column in zip(*values)]

    return LocalMeasurements(
        latency=min(row.latency for row in rows),
        base=max(row.base for row in rows),
        ready=each([row.ready for row in rows], max),
        dense_jobs=each([row.dense_jobs for row in rows], min),
        trial_jobs={method: each([row.trial_jobs[method] for row in rows], min) for method in methods},
    )


def summarise_steps(steps: Sequence[StepTiming]) -> dict[str, list[float]]:
    """Per-bucket medians over steps (medians: an evaluation or a checkpoint inside a measured
    step must not move the decision)."""
    return {
        "ready": [statistics.median(column) for column in zip(*(s.ready for s in steps))],
        "jobs": [statistics.median(column) for column in zip(*(s.jobs for s in steps))],
    }


def median_base(steps: Sequence[StepTiming]) -> Optional[float]:
    """Median of ``period - exposed`` over the steps whose period is known."""
    values = [s.period - s.exposed for s in steps if s.period is not None]
    return statistics.median(values) if values else None
