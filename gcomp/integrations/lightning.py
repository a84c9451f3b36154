"""gcomp in PyTorch Lightning: one callback, any DDP strategy, CPU and GPU alike.

::

    from gcomp.integrations.lightning import GcompCallback

    gcomp_callback = GcompCallback("powersgd", rank=4, warmup_steps=100)
    trainer = L.Trainer(accelerator="gpu", devices=8, strategy="ddp", callbacks=[gcomp_callback])
    trainer.fit(model)
    print(trainer.strategy.gcomp_state.stats()["compression_ratio"])   # or gcomp_callback.state

Why a callback and not ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``: Lightning's
``DDPStrategy`` registers a comm hook only when its root device is CUDA, and silently skips it
otherwise (CPU/gloo runs then train uncompressed); and a state built before ``fit`` cannot be
attached to the model, because Lightning creates the ``DistributedDataParallel`` wrapper itself.
``on_fit_start`` runs after the strategy has wrapped the model and before the first backward, so
the callback calls :func:`gcomp.register` on ``trainer.strategy.model`` there: the hook is installed
whatever the device, and state is keyed by the LightningModule's real parameter names.

Checkpoints: gcomp state is per rank (error-feedback buffers differ between ranks), but Lightning
writes one checkpoint file from rank 0. When Lightning builds a checkpoint (on every rank), the
callback gathers every rank's ``state.state_dict()`` (moved to CPU) to all ranks and stores the
list under ``checkpoint["gcomp"]``; on resume each rank loads its own entry (another world size
loads rank 0's entry, whose replicated state gcomp keeps and whose per-rank buffers it resets,
with a warning). The file grows by the per-rank buffers of every rank: for top-k EF21 that is
about two gradient-sized float32 buffers per rank; pass ``save_state=False`` to keep checkpoints
small (compression then restarts its warm-up state on resume).

With ``precision="16-mixed"`` the callback forwards the loss scale of Lightning's ``GradScaler``
to the state before every backward (``state.set_gradient_scale``), so error feedback stays exact
when the scaler changes its scale.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Union

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    try:  # the standalone package name of the same code
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError:
        raise ImportError(
            "gcomp.integrations.lightning needs PyTorch Lightning: pip install 'gcomp[lightning]' "
            "(or pip install lightning)"
        ) from error

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..adaptive import AdaptiveConfig
from ..api import register
from ..hooks import HookState

logger = logging.getLogger("gcomp.integrations.lightning")

CHECKPOINT_KEY = "gcomp"
"""Key of the per-rank gcomp states in a Lightning checkpoint dict."""


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU, so it pickles for an object
    collective and loads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class GcompCallback(Callback):
    """Install a gcomp comm hook on the DDP model Lightning builds, at the start of ``fit``.

    Args:
        method: a gcomp method (``gcomp.METHODS``): ``"powersgd"``, ``"topk"``, ``"fp16"``, ...
        adaptive: ``True`` or a :class:`gcomp.AdaptiveConfig` for L-GreCo per-layer settings.
        save_state: store every rank's gcomp state in Lightning checkpoints and restore it on resume.
        **options: the method's options, as for :func:`gcomp.register` (``rank=4``, ``density=0.01``, ...).

    After ``fit`` (and during it) the state is ``callback.state`` and ``trainer.strategy.gcomp_state``;
    its communication thread is stopped at the end of ``fit``, its ``stats()`` stay readable. A second
    ``fit`` with the same callback continues from the first one's state.

    Works with every strategy whose ``trainer.strategy.model`` is a ``DistributedDataParallel``
    (``"ddp"``, :class:`~lightning.pytorch.strategies.DDPStrategy`; with ``"ddp_spawn"`` the state
    lives in the spawned workers, not in the launching process); other multi-process strategies
    (FSDP, DeepSpeed) raise ``TypeError``. A single-process run has no
    gradient exchange: the callback warns and installs nothing (``state`` stays ``None``).
    """

    def __init__(self, method: str = "powersgd", *, adaptive: Union[bool, AdaptiveConfig] = False, save_state: bool = True, **options: Any) -> None:
        super().__init__()
        self.method = method
        self.adaptive = adaptive
        self.save_state = save_state
        self.options = options
        self.state: Optional[HookState] = None
        self._pending: Optional[dict[str, Any]] = None  # loaded from a checkpoint before the hook existed

    @property
    def state_key(self) -> str:
        return f"GcompCallback[{self.method}]"

    # ------------------------------------------------------------------ installing the hook
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            if trainer.world_size > 1:
                raise TypeError(
                    f"GcompCallback needs a DistributedDataParallel model; strategy {type(trainer.strategy).__name__} "
                    f"wraps it in {type(model).__name__} (use strategy='ddp' or a DDPStrategy)"
                )
            warnings.warn("GcompCallback: single-process run, no gradients are exchanged: no gcomp hook installed", stacklevel=2)
            return
        previous = self.state
        self.state = register(model, self.method, adaptive=self.adaptive, **self.options)
        if previous is not None:  # a second fit: continue counters, residuals and factors
            self.state.load_state_dict(previous.state_dict())
            previous.close()
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        trainer.strategy.gcomp_state = self.state  # type: ignore[attr-defined]
        logger.info("gcomp %s hook installed on %s (rank %d of %d)", self.method, type(pl_module).__name__, trainer.global_rank, trainer.world_size)

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.state is not None and scaler is not None and scaler.is_enabled():
            self.state.set_gradient_scale(scaler.get_scale())

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Stop the communication thread before the launcher destroys the process group; stats()
        # and state_dict() keep working on a closed state.
        if stage == "fit" and self.state is not None:
            self.state.close()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Lightning builds the checkpoint dict on every rank and writes rank 0's: gather here.
        if not self.save_state or self.state is None:
            return
        mine = _to_cpu(self.state.state_dict())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        checkpoint[CHECKPOINT_KEY] = {"method": self.method, "world_size": len(everyone), "ranks": everyone}

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if not self.save_state or saved is None:
            return
        if self.state is None:  # usual order: checkpoint restored before the strategy wraps the model
            self._pending = saved
        else:
            self._load(saved)

    def _load(self, saved: dict[str, Any]) -> None:
        assert self.state is not None
        ranks = saved["ranks"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # Another world size: rank 0's entry carries the replicated state; gcomp's load_state_dict
        # sees its world size differs and resets the per-rank buffers (with a warning).
        entry = ranks[rank] if len(ranks) == (dist.get_world_size() if dist.is_initialized() else 1) else ranks[0]
        self.state.load_state_dict(entry)
        logger.info("gcomp state restored from checkpoint (saved by %d ranks, step %s)", len(ranks), entry.get("step"))
