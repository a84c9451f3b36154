"""gcomp: communication compression for PyTorch DistributedDataParallel.

One line turns it on::

    state = gcomp.register(ddp_model, "powersgd", rank=4)

or, PyTorch style, ``ddp_model.register_comm_hook(gcomp.PowerSGDState(rank=4), gcomp.powersgd_hook)``.
"""
from ._version import __version__
from .adaptive import AdaptiveConfig, AdaptiveController, TimeAwareConfig, TimeAwareController
from .api import METHODS, register
from .precondition import LocalAdamW, LocalLion, LocalMomentum
from .hooks import (
    AllreduceState,
    AutoState,
    BF16State,
    FP16State,
    HookState,
    PowerSGDState,
    QuantizeState,
    TopKState,
    allreduce_hook,
    auto_hook,
    bf16_hook,
    fp16_hook,
    powersgd_hook,
    quantize_hook,
    topk_hook,
)

__all__ = [
    "__version__",
    "METHODS",
    "AdaptiveConfig",
    "AdaptiveController",
    "AllreduceState",
    "AutoState",
    "BF16State",
    "FP16State",
    "HookState",
    "LocalAdamW",
    "LocalLion",
    "LocalMomentum",
    "PowerSGDState",
    "QuantizeState",
    "TimeAwareConfig",
    "TimeAwareController",
    "TopKState",
    "allreduce_hook",
    "auto_hook",
    "bf16_hook",
    "fp16_hook",
    "powersgd_hook",
    "quantize_hook",
    "register",
    "topk_hook",
]
