"""Compress after preconditioning: each rank sends its local AdamW or Lion *direction* (or, for
SGD, its momentum buffer), not its gradient.

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

:class:`LocalLion` (``precondition="lion"``) sends each rank's Lion direction, whose entries are
+-1: a one-bit message carries it exactly (Distributed Lion), stepped by SGD with Lion's learning
rate and weight decay.

For SGD with momentum the same swap is :class:`LocalMomentum` (``precondition="momentum"``): every
rank keeps SGD's momentum buffer of its own gradients and sends it, and the model is stepped by
momentum-free SGD (DGC's momentum correction). Momentum is linear, so here the swap changes nothing
when nothing is compressed; it decides only where error feedback acts.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Union

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

if TYPE_CHECKING:
    from .hooks.layout import BucketLayout
    from .hooks.store import LayerStore

FIRST_MOMENT, SECOND_MOMENT, MOMENT_STEPS = "adamw_m", "adamw_v", "adamw_steps"
VELOCITY = "momentum_buffer"
LION_MOMENT = "lion_m"


def checked_betas(betas: Any) -> tuple[float, float]:
    """Two moment decay rates, each in [0, 1)."""
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1); got {betas!r}")
    return (float(betas[0]), float(betas[1]))


def unscaled_layer_gradients(buffer: torch.Tensor, layout: "BucketLayout", gradient_scale: Optional[float]) -> Iterator[tuple[Any, torch.Tensor]]:
    """Each non-empty layer of ``buffer`` with its gradient in float32 (float64 for a float64
    bucket) and without the loss scale: the moments are kept in unscaled gradient units. Without
    a scale the gradient of a float32 bucket is a view of it: read it before writing the layer."""
    dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    for slot in layout.layers:
        if slot.numel == 0:
            continue
        gradient = slot.flat(buffer).to(dtype)
        yield slot, gradient / gradient_scale if gradient_scale is not None else gradient


class LocalAdamW:
    """This rank's AdamW direction of each layer (``gcomp.register(..., precondition=LocalAdamW())``
    or ``precondition="adamw"``)."""

    name = "adamw"
    sends, optimizer = "AdamW directions", "torch.optim.SGD(params, lr=<AdamW lr>, weight_decay=<AdamW weight decay>)"
    tensors = (FIRST_MOMENT, SECOND_MOMENT, MOMENT_STEPS)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas = checked_betas(betas)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "betas": list(self.betas), "eps": self.eps}

    def single_momentum_hint(self) -> Optional[str]:
        """How to leave EF21-SGDM's momentum the only average of gradients (``None``: already)."""
        if self.betas[0] == 0:
            return None
        return f"precondition=gcomp.LocalAdamW(betas=(0.0, {self.betas[1]})): EF21-SGDM's momentum is then AdamW's first moment"

    def direction_(self, buffer: torch.Tensor, layout: "BucketLayout", store: "LayerStore", gradient_scale: Optional[float]) -> None:
        """Replace every layer of ``buffer`` by this rank's AdamW direction (times the loss scale,
        if any) and stage the updated moments (committed with the step)."""
        first, second = self.betas
        for slot, gradient in unscaled_layer_gradients(buffer, layout, gradient_scale):
            dtype, shape, device = gradient.dtype, (slot.numel,), buffer.device
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


class LocalMomentum:
    """This rank's heavy-ball momentum of each layer (``precondition="momentum"`` or
    ``LocalMomentum(momentum=0.9)``): SGD's momentum moved in front of the compressor, as in DGC's
    momentum correction. Each rank keeps ``b = momentum * b + g`` of its own gradients (PyTorch's
    SGD buffer, dampening 0) and sends ``b``; the model is stepped by momentum-free SGD with the
    same learning rate. Momentum is linear, so the dense average of the ranks' buffers is the buffer
    of the averaged gradients: sent uncompressed, this mode is SGD with momentum. Compressed, error
    feedback works on the velocity, so an entry held back is not also re-amplified by a momentum
    applied after the exchange."""

    name = "momentum"
    sends, optimizer = "momentum buffers", "torch.optim.SGD(params, lr=<your lr>)"
    tensors = (VELOCITY,)

    def __init__(self, momentum: float = 0.9) -> None:
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1); got {momentum!r}")
        self.momentum = float(momentum)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "momentum": self.momentum}

    def single_momentum_hint(self) -> Optional[str]:
        """How to leave EF21-SGDM's momentum the only average of gradients (``None``: already)."""
        if self.momentum == 0:
            return None
        return "no precondition, and momentum-free SGD at lr / (1 - EF21-SGDM's momentum): its momentum is then SGD's"

    def direction_(self, buffer: torch.Tensor, layout: "BucketLayout", store: "LayerStore", gradient_scale: Optional[float]) -> None:
        """Replace every layer of ``buffer`` by this rank's momentum buffer (in the buffer's loss
        scale, kept unscaled) and stage it (committed with the step)."""
        for slot, gradient in unscaled_layer_gradients(buffer, layout, gradient_scale):
            velocity = store.get(slot.name, VELOCITY, (slot.numel,), gradient.dtype, buffer.device)
            velocity = gradient.clone() if velocity is None else velocity * self.momentum + gradient
            slot.flat(buffer).copy_(velocity * gradient_scale if gradient_scale is not None else velocity)
            store.stage(slot.name, {VELOCITY: velocity})


class LocalLion:
    """This rank's Lion direction of each layer (``precondition="lion"`` or
    ``LocalLion(betas=(0.9, 0.99))``), as in Distributed Lion (Liu et al., 2024). Each rank keeps
    Lion's moment ``m`` of its own gradients and sends

        u = sign(b1 m + (1 - b1) g),   then   m = b2 m + (1 - b2) g,

    whose entries are +-1 already: a one-bit message (``quantize``, ``bits=1``) carries it with
    nothing left over, so error feedback has nothing to correct (EF14's residual stays zero) and
    the ranks' average is Distributed Lion's averaged vote. Step the model with
    ``torch.optim.SGD(params, lr=<Lion lr>, weight_decay=<Lion weight decay>)``: Lion's learning
    rate is typically 3-10x below AdamW's and its weight decay as much above, so that
    ``lr * weight_decay`` stays the same."""

    name = "lion"
    sends, optimizer = "Lion directions (signs)", "torch.optim.SGD(params, lr=<Lion lr>, weight_decay=<Lion weight decay>)"
    tensors = (LION_MOMENT,)

    def __init__(self, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        self.betas = checked_betas(betas)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "betas": list(self.betas)}

    def single_momentum_hint(self) -> Optional[str]:
        """How to leave EF21-SGDM's momentum the only average of gradients: Lion's moment is part
        of its direction, so never with Lion."""
        return "feedback='ef14', 'ef21' or 'econtrol' with Lion directions, whose moment is part of the direction"

    def direction_(self, buffer: torch.Tensor, layout: "BucketLayout", store: "LayerStore", gradient_scale: Optional[float]) -> None:
        """Replace every layer of ``buffer`` by this rank's Lion direction (times the loss scale, if
        any) and stage the updated moment (committed with the step)."""
        interpolation, decay = self.betas
        for slot, gradient in unscaled_layer_gradients(buffer, layout, gradient_scale):
            moment = store.get(slot.name, LION_MOMENT, (slot.numel,), gradient.dtype, buffer.device)
            if moment is None:
                moment = torch.zeros_like(gradient)
            direction = torch.sign(moment * interpolation + gradient * (1 - interpolation))
            # Staged before the copy, which may overwrite ``gradient`` (see unscaled_layer_gradients).
            store.stage(slot.name, {LION_MOMENT: moment * decay + gradient * (1 - decay)})
            slot.flat(buffer).copy_(direction * gradient_scale if gradient_scale is not None else direction)


Preconditioner = Union[LocalAdamW, LocalMomentum, LocalLion]
PRECONDITIONERS = {"adamw": LocalAdamW, "momentum": LocalMomentum, "lion": LocalLion}


def make_preconditioner(precondition: Any) -> Optional[Preconditioner]:
    """``None``, ``"adamw"``, ``"momentum"``, ``"lion"``, or a :class:`LocalAdamW` /
    :class:`LocalMomentum` / :class:`LocalLion`."""
    if precondition is None or isinstance(precondition, (LocalAdamW, LocalMomentum, LocalLion)):
        return precondition
    if isinstance(precondition, str) and precondition in PRECONDITIONERS:
        return PRECONDITIONERS[precondition]()
    raise ValueError(f"precondition must be None, 'adamw', 'momentum', 'lion', a gcomp.LocalAdamW, a gcomp.LocalMomentum or a gcomp.LocalLion; got {precondition!r}")


class OptimizerGuard:
    """Refuses, at its first step, any optimizer other than momentum-free SGD over parameters whose
    gradients are preconditioned directions (a second AdamW on top would normalise them twice, a
    second momentum would apply momentum twice)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], preconditioner: Preconditioner) -> None:
        self.parameter_ids = {id(p) for p in parameters}
        self.preconditioner = preconditioner
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
                    f"gcomp: this DDP model's gradients are averaged {self.preconditioner.sends} (precondition="
                    f"'{self.preconditioner.name}'); step them with {self.preconditioner.optimizer} and momentum 0; {problem}"
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
