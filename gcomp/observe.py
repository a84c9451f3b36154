"""Watching a run: a state's counters as TensorBoard scalars or JSON lines, and a progress bar.

::

    from gcomp.observe import TensorBoardLogger

    state = gcomp.register(ddp_model, "powersgd", rank=4, adaptive=True)
    tb = TensorBoardLogger(state, "runs/powersgd")        # a directory, or any SummaryWriter
    for step in range(steps):
        ...
        if step % 10 == 0:
            tb.log(step)                                   # rank 0 writes, other ranks do nothing
    tb.close()

Scalars (tags under ``gcomp/``, one TensorBoard section each):

- ``gcomp/bytes_sent``, ``bytes_received``, ``bytes_uncompressed``, ``compression_ratio``,
  ``steps``, ``compressed_steps``, ``skipped_steps``: ``state.stats()`` as is (cumulative);
  ``gcomp/bytes_sent_per_step``: bytes sent per sync step since the previous ``log``;
- ``gcomp_time/<phase>``: host seconds per phase (``stats()["seconds"]``: compress, collective,
  decompress, decide)
  (e.g. ``compress``, ``collective``, ``decompress``);
- ``gcomp_layers/rank/<parameter>`` or ``gcomp_layers/density/<parameter>``: each layer's current
  setting when it is numeric (adaptive runs change them);
- ``gcomp_adaptive/*``: each L-GreCo decision (predicted and uniform bytes, error and budget, whether
  it fell back to uniform), written at the step it was made, once.

The numbers are the state's own counters on this rank; with the same model on every rank they are
the same on every rank (top-k's received bytes aside), so rank 0 writing them is enough.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Iterable, Iterator, Optional, TypeVar, Union

import torch.distributed as dist

logger = logging.getLogger("gcomp.observe")

T = TypeVar("T")

TOTALS = ("bytes_sent", "bytes_received", "bytes_uncompressed", "compression_ratio", "steps", "compressed_steps", "dense_steps", "skipped_steps")
"""Keys of ``state.stats()`` written as ``gcomp/<key>`` when present."""

ADAPTIVE_KEYS = ("predicted_bytes", "uniform_bytes", "predicted_error", "error_budget", "measured_bytes_per_step_since_last", "used_fallback")
"""Keys of an L-GreCo decision record written as ``gcomp_adaptive/<key>``."""


def _is_number(value: Any) -> bool:
    """Ints, floats and bools (a flag plots as 0/1); None and strings are not scalars."""
    return isinstance(value, (int, float))


def _layer_setting(setting: Any) -> Optional[tuple[str, float]]:
    """``"rank=4"`` -> ``("rank", 4.0)``; non-numeric settings (``"dense"``, ``"fp16"``) -> None."""
    if not isinstance(setting, str) or "=" not in setting:
        return None
    name, _, value = setting.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        return None


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numbers of a (nested) dict as ``prefix/key/...`` scalars; other values are skipped."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif _is_number(value):
        out[prefix] = float(value)


def scalars(stats: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one ``state.stats()`` dict (see the module docstring)."""
    out: dict[str, float] = {}
    for key in TOTALS:
        if _is_number(stats.get(key)):
            out[f"gcomp/{key}"] = float(stats[key])
    _flatten("gcomp_time", stats.get("seconds") or {}, out)
    for name, layer in (stats.get("layers") or {}).items():
        setting = _layer_setting(layer.get("setting") if isinstance(layer, dict) else getattr(layer, "setting", None))
        if setting is not None:
            out[f"gcomp_layers/{setting[0]}/{name}"] = setting[1]
    return out


def adaptive_scalars(record: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one L-GreCo decision record (``state.controller.history[i]``)."""
    return {f"gcomp_adaptive/{key}": float(record[key]) for key in ADAPTIVE_KEYS if _is_number(record.get(key))}


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _StateLogger:
    """What both sinks share: rank-0 gating, per-interval rates, decisions written once."""

    def __init__(self, state: Any, rank_zero_only: bool = True) -> None:
        self.state = state
        self.enabled = _is_rank_zero() or not rank_zero_only
        self._previous: Optional[tuple[float, float]] = None  # (steps, bytes_sent) at the last log
        self._decisions_logged = 0

    def _collect(self) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
        stats = self.state.stats()
        values = scalars(stats)
        steps, sent = float(stats.get("steps", 0)), float(stats.get("bytes_sent", 0))
        if self._previous is not None and steps > self._previous[0]:
            values["gcomp/bytes_sent_per_step"] = (sent - self._previous[1]) / (steps - self._previous[0])
        self._previous = (steps, sent)
        decisions: list[tuple[int, dict[str, float]]] = []
        controller = getattr(self.state, "controller", None)
        history = list(getattr(controller, "history", None) or [])
        for record in history[self._decisions_logged :]:
            decisions.append((int(record.get("step", 0)), adaptive_scalars(record)))
        self._decisions_logged = len(history)
        return values, decisions


class TensorBoardLogger(_StateLogger):
    """Write a gcomp state's counters to TensorBoard at the steps you choose.

    Args:
        state: the object :func:`gcomp.register` returned (anything with ``stats()``).
        log_dir_or_writer: a directory (a ``torch.utils.tensorboard.SummaryWriter`` is created
            there, needs the ``tensorboard`` package: ``pip install 'gcomp[tensorboard]'``) or an
            existing writer with ``add_scalar`` (SummaryWriter, tensorboardX, Lightning's
            ``trainer.logger.experiment``), which is shared and not closed by :meth:`close`.
        rank_zero_only: other ranks neither create a writer nor write (the default).
    """

    def __init__(self, state: Any, log_dir_or_writer: Union[str, "os.PathLike[str]", Any], *, rank_zero_only: bool = True) -> None:
        super().__init__(state, rank_zero_only)
        self._owns_writer = isinstance(log_dir_or_writer, (str, os.PathLike))
        self.writer: Any = None
        if not self.enabled:
            return
        if self._owns_writer:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("gcomp.observe.TensorBoardLogger needs TensorBoard: pip install 'gcomp[tensorboard]' (or pip install tensorboard)") from error
            self.writer = SummaryWriter(log_dir=os.fspath(log_dir_or_writer))
        else:
            if not callable(getattr(log_dir_or_writer, "add_scalar", None)):
                raise TypeError(f"TensorBoardLogger needs a directory or a writer with add_scalar; got {type(log_dir_or_writer).__name__}")
            self.writer = log_dir_or_writer

    def log(self, step: int) -> dict[str, float]:
        """Write the current scalars at ``step`` (and new adaptive decisions at their own steps);
        returns what was written (empty on ranks that do not write)."""
        if not self.enabled:
            return {}
        values, decisions = self._collect()
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        for decision_step, record in decisions:
            for tag, value in record.items():
                self.writer.add_scalar(tag, value, decision_step)
        return values

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this logger created it."""
        if self.writer is None:
            return
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class JsonLinesLogger(_StateLogger):
    """The same scalars as :class:`TensorBoardLogger`, one JSON object per :meth:`log` call, for
    plotting without TensorBoard: ``{"step": 100, "scalars": {tag: value}, "decisions": [...]}``."""

    def __init__(self, state: Any, path: Union[str, "os.PathLike[str]"], *, rank_zero_only: bool = True) -> None:
        super().__init__(state, rank_zero_only)
        self.path = os.fspath(path)

    def log(self, step: int) -> dict[str, float]:
        if not self.enabled:
            return {}
        values, decisions = self._collect()
        record = {"step": int(step), "scalars": values, "decisions": [{"step": s, "scalars": d} for s, d in decisions]}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        return values

    def close(self) -> None:
        """Nothing to release: every :meth:`log` appends and closes the file."""


def progress(
    iterable: Iterable[T], *, total: Optional[int] = None, desc: Optional[str] = None, enabled: bool = True, **options: Any
) -> Iterator[T]:
    """``iterable`` wrapped in a tqdm bar when one belongs on screen, else ``iterable`` unchanged.

    No bar when ``enabled`` is False (e.g. ``--no-progress``, or not rank 0), when stderr is not a
    terminal (logs and CI stay free of carriage-return noise), or when tqdm is not installed
    (``pip install 'gcomp[progress]'``). Print through :func:`progress_write` while a bar runs.
    """
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            logger.debug("tqdm is not installed: no progress bar")
        else:
            return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **options)
    return iter(iterable)


class _NoBar:
    """Stands in for a tqdm bar when none is shown, so callers need no ``if``."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_counter(*, total: int, desc: Optional[str] = None, enabled: bool = True, **options: Any) -> Any:
    """A bar advanced by hand (``bar.update()``), for loops that are not one iterable (nested
    runs); same rules as :func:`progress`. Without a bar it returns an object with the same
    ``update`` / ``set_postfix_str`` / ``close`` methods that does nothing."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            logger.debug("tqdm is not installed: no progress bar")
        else:
            return tqdm(total=total, desc=desc, dynamic_ncols=True, **options)
    return _NoBar()


def progress_write(bar: Any, message: str) -> None:
    """Print ``message`` above ``bar`` (a :func:`progress` result) without breaking it."""
    write = getattr(type(bar), "write", None)
    if write is not None:  # tqdm.write: clears the bar, prints, redraws it
        write(message)
    else:
        print(message, flush=True)
