"""Compress after preconditioning: each rank sends its local AdamW *direction*, not its gradient.

Error feedback is built on linearity: what a compressor leaves out now is sent later, and the sum
of what was sent tracks the sum of the gradients. AdamW is not linear. Fed a sparse, stale estimate
of the gradient, it normalises every coordinate, so an entry refreshed once in a hundred steps
moves its weight by about ``lr`` at every step in between (near-sign steps on stale data). Here the
order is swapped (as in DeMo, Distributed Lion and 1-bit Adam's momentum compression): every rank
keeps AdamW's moments of its *own* gradients and forms its own direction

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),

then the hook compresses ``u`` (with error feedback on the direction) and averages it over the
ranks. What reaches the optimizer is an average of AdamW directions, so it must be stepped by
plain SGD with decoupled weight decay: ``torch.optim.SGD(params, lr=<AdamW's lr>,
weight_decay=<AdamW's weight_decay>)`` (for momentum-free SGD, L2 and decoupled decay are the
same update). Any other optimizer on the model's parameters is refused at its first step.

The moments are per-rank state of the hook (checkpointed with it, dropped with a skipped step),
kept in unscaled gradient units; with ``GradScaler`` (``state.set_gradient_scale``) the direction
is multiplied by the loss scale again, so that the scaler's unscale gives the direction itself.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .hooks.layout import BucketLayout
    from .hooks.store import LayerStore

FIRST_MOMENT, SECOND_MOMENT, MOMENT_STEPS = "adamw_m", "adamw_v", "adamw_steps"


class LocalAdamW:
    """This rank's AdamW direction of each layer (``gcomp.register(..., precondition=LocalAdamW())``
    or ``precondition="adamw"``)."""

    name = "adamw"
    tensors = (FIRST_MOMENT, SECOND_MOMENT, MOMENT_STEPS)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps}

    def direction_(self, buffer: torch.Tensor, layout: "BucketLayout", store: "LayerStore", gradient_scale: Optional[float]) -> None:
        """Replace every layer of ``buffer`` by this rank's AdamW direction (times the loss scale,
        if any) and stage the updated moments (committed with the step)."""
        dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        first, second = self.betas
        for slot in layout.layers:
            if slot.numel == 0:
                continue
            gradient = slot.flat(buffer).to(dtype)
            if gradient_scale is not None:
                gradient = gradient / gradient_scale
            shape, device = (slot.numel,), buffer.device
            moment = store.get(slot.name, FIRST_MOMENT, shape, dtype, device)
            square = store.get(slot.name, SECOND_MOMENT, shape, dtype, device)
            steps = store.get(slot.name, MOMENT_STEPS, (), torch.float64, device)
            if moment is None or square is None or steps is None:
                moment, square = torch.zeros_like(gradient), torch.zeros_like(gradient)
                steps = torch.zeros((), dtype=torch.float64, device=device)
            moment = moment * first + gradient * (1 - first)
            square = square * second + gradient * gradient * (1 - second)
            steps = steps + 1
            # Bias corrections as device tensors: no host read on the communication thread.
            first_correction = (1 - torch.pow(first, steps)).to(dtype)
            second_correction = (1 - torch.pow(second, steps)).to(dtype)
            direction = (moment / first_correction) / ((square / second_correction).sqrt() + self.eps)
            if gradient_scale is not None:
                direction = direction * gradient_scale
            slot.flat(buffer).copy_(direction)
            store.stage(slot.name, {FIRST_MOMENT: moment, SECOND_MOMENT: square, MOMENT_STEPS: steps})


def make_preconditioner(precondition: Any) -> Optional[LocalAdamW]:
    """``None``, ``"adamw"`` or a :class:`LocalAdamW`."""
    if precondition is None or isinstance(precondition, LocalAdamW):
        return precondition
    if precondition == "adamw":
        return LocalAdamW()
    raise ValueError(f"precondition must be None, 'adamw' or a gcomp.LocalAdamW; got {precondition!r}")


class OptimizerGuard:
    """Refuses, at its first step, any optimizer other than momentum-free SGD over parameters whose
    gradients are AdamW directions (a second AdamW on top would normalise them twice)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.parameter_ids = {id(p) for p in parameters}
        self.checked: set[int] = set()
        self.handle = register_optimizer_step_pre_hook(self._check)

    def _check(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self.checked:
            return
        ours = any(id(p) in self.parameter_ids for group in optimizer.param_groups for p in group["params"])
        if ours:
            problem = optimizer_problem(optimizer)
            if problem:
                raise ValueError(
                    f"gcomp: this DDP model's gradients are averaged AdamW directions (precondition='adamw'); step them "
                    f"with torch.optim.SGD(params, lr=<AdamW lr>, weight_decay=<AdamW weight decay>) and momentum 0; {problem}"
                )
        self.checked.add(id(optimizer))

    def remove(self) -> None:
        self.handle.remove()


def optimizer_problem(optimizer: torch.optim.Optimizer) -> str:
    """Why ``optimizer`` cannot step preconditioned directions ('' when it can)."""
    if type(optimizer) is not torch.optim.SGD:
        return f"got {type(optimizer).__name__}"
    for group in optimizer.param_groups:
        if group.get("momentum", 0) != 0 or group.get("nesterov", False) or group.get("maximize", False):
            return f"got SGD with momentum={group.get('momentum')}, nesterov={group.get('nesterov')}, maximize={group.get('maximize')}"
    return ""
