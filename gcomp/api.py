"""``gcomp.register``: the one-line way to compress a DDP model's gradient traffic."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .adaptive import AdaptiveConfig, AdaptiveController, TimeAwareConfig, TimeAwareController
from . import hooks
from .hooks import HookState

METHODS: dict[str, type[HookState]] = {
    "allreduce": hooks.AllreduceState,
    "fp16": hooks.FP16State,
    "bf16": hooks.BF16State,
    "powersgd": hooks.PowerSGDState,
    "topk": hooks.TopKState,
    "quantize": hooks.QuantizeState,
    "auto": hooks.AutoState,
}

# Each method's own hook (it refuses a state of another method).
HOOKS: dict[str, Callable[..., Any]] = {
    "allreduce": hooks.allreduce_hook,
    "fp16": hooks.fp16_hook,
    "bf16": hooks.bf16_hook,
    "powersgd": hooks.powersgd_hook,
    "topk": hooks.topk_hook,
    "quantize": hooks.quantize_hook,
    "auto": hooks.auto_hook,
}

_STATE_ATTRIBUTE = "_gcomp_state"


def register(
    ddp_model: DistributedDataParallel,
    method: str,
    *,
    process_group: Optional[dist.ProcessGroup] = None,
    adaptive: Union[bool, AdaptiveConfig] = False,
    time_aware: Union[bool, TimeAwareConfig] = False,
    **options: Any,
) -> HookState:
    """Register gcomp's hook for ``method`` on ``ddp_model`` and return its state.

    ``options`` are the keyword arguments of the method's state class (e.g. ``rank=4`` for
    ``"powersgd"``; see the README's option table). Call before the first backward pass, on every
    rank with the same arguments. Keep the returned state: it has ``stats()``, ``state_dict()`` and
    ``load_state_dict()``.

    ``precondition="adamw"`` (or a :class:`~gcomp.LocalAdamW`) sends each rank's local AdamW
    direction instead of its gradient; step the model with ``torch.optim.SGD(params, lr,
    weight_decay=...)`` (see :mod:`gcomp.precondition`); ``precondition="momentum"`` (or a
    :class:`~gcomp.LocalMomentum`) sends each rank's SGD momentum buffer (step with momentum-free SGD);
    ``precondition="lion"`` (or a :class:`~gcomp.LocalLion`) sends each rank's Lion direction (step
    with ``torch.optim.SGD(params, lr=<Lion lr>, weight_decay=<Lion weight decay>)``).

    ``adaptive=True`` (or an :class:`~gcomp.adaptive.AdaptiveConfig`) attaches the L-GreCo
    controller to ``"powersgd"`` / ``"topk"`` / ``"quantize"``: per-layer ranks / densities / bit
    widths re-chosen every
    ``every_steps`` sync steps (``state.controller.epoch_end()`` to decide at an epoch's end).

    ``time_aware=True`` (or a :class:`~gcomp.adaptive.TimeAwareConfig`) makes ``"powersgd"`` /
    ``"topk"`` / ``"quantize"`` send a layer dense where compressing it is predicted not to shorten
    the step (measured during the warm-up and the first compressed steps; needs ``warmup_steps``
    >= 3). ``"auto"`` always decides so, between dense, PowerSGD and top-k (the config goes to it).
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"gcomp.register needs a torch.nn.parallel.DistributedDataParallel model; got {type(ddp_model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if getattr(ddp_model, _STATE_ATTRIBUTE, None) is not None:
        raise ValueError("a gcomp hook is already registered on this DDP model (DDP allows one comm hook per model)")
    if not isinstance(adaptive, (bool, AdaptiveConfig)):
        raise TypeError(f"adaptive must be True, False or a gcomp.AdaptiveConfig; got {type(adaptive).__name__}")
    if not isinstance(time_aware, (bool, TimeAwareConfig)):
        raise TypeError(f"time_aware must be True, False or a gcomp.TimeAwareConfig; got {type(time_aware).__name__}")
    time_config = time_aware if isinstance(time_aware, TimeAwareConfig) else TimeAwareConfig()
    precondition = options.pop("precondition", None)
    if method == "auto":
        state = METHODS[method](process_group, time_aware=time_config, **options)
    else:
        state = METHODS[method](process_group, **options)
    if precondition is not None:
        state.set_preconditioner(precondition, ddp_model.parameters())
    if adaptive:
        AdaptiveController(state, adaptive if isinstance(adaptive, AdaptiveConfig) else AdaptiveConfig())
    if time_aware and method != "auto":
        TimeAwareController(state, time_config)
    state.attach(ddp_model)
    ddp_model.register_comm_hook(state, HOOKS[method])
    setattr(ddp_model, _STATE_ATTRIBUTE, state)
    return state
