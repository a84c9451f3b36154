"""Per-layer state of a hook, with its step-wise commit and its checkpoint.

A hook keeps tensors per layer name (PowerSGD: ``error`` and ``q``; top-k: whatever its feedback
rule stores). Two facts shape this store:

- **Nothing is written during a step.** A codec *stages* its updates; at the end of the step they
  are all committed, or all dropped when some bucket of the step was non-finite (a
  GradScaler-skipped step must leave no trace in error buffers or warm-start factors). This is the
  only commit mechanism in gcomp.
- **Replicated vs per-rank.** Replicated tensors (PowerSGD's Q, EF21's global estimate) are
  identical on every rank and survive a change of world size; per-rank ones (residuals, local
  estimates) do not. Gradient-valued tensors are measured in loss-scaled gradient units and are
  rescaled when the loss scale changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch


@dataclass(frozen=True)
class StagedUpdate:
    """Replace some of ``layer``'s tensors and forget others, at the end of the step."""

    layer: str
    tensors: Mapping[str, torch.Tensor]
    forget: tuple[str, ...] = ()


class LayerStore:
    """``layer name -> tensor name -> tensor``, written only through :meth:`stage` + :meth:`commit`."""

    def __init__(self, replicated: Iterable[str], per_rank: Iterable[str], gradient_valued: Iterable[str]) -> None:
        self.replicated = tuple(replicated)
        self.per_rank = tuple(per_rank)
        self.gradient_valued = tuple(gradient_valued)
        self.layers: dict[str, dict[str, torch.Tensor]] = {}
        self._staged: list[StagedUpdate] = []

    def get(self, layer: str, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """The stored tensor if it exists with this shape, dtype and device, else None (a stale
        entry, e.g. from a checkpoint with another rank setting, is forgotten; one on another
        device, e.g. loaded with ``map_location="cpu"``, is moved)."""
        tensors = self.layers.get(layer)
        if tensors is None or key not in tensors:
            return None
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            del tensors[key]
            return None
        if tensor.device != device:
            tensor = tensors[key] = tensor.to(device)
        return tensor

    def peek(self, layer: str, key: str) -> Optional[torch.Tensor]:
        """The stored tensor whatever its shape (for codecs that reuse part of it, e.g. a warm-start
        factor whose rank changed)."""
        return self.layers.get(layer, {}).get(key)

    def stage(self, layer: str, tensors: Mapping[str, torch.Tensor], forget: Iterable[str] = ()) -> None:
        """Defer an update to the end of the step (see the module docstring)."""
        self._staged.append(StagedUpdate(layer, dict(tensors), tuple(forget)))

    def commit(self) -> None:
        for update in self._staged:
            tensors = self.layers.setdefault(update.layer, {})
            for key in update.forget:
                tensors.pop(key, None)
            tensors.update(update.tensors)
            if not tensors:
                del self.layers[update.layer]
        self._staged.clear()

    def drop(self) -> None:
        self._staged.clear()

    def rescale_gradient_valued(self, ratio: float) -> None:
        for tensors in self.layers.values():
            for key in self.gradient_valued:
                if key in tensors:
                    tensors[key].mul_(ratio)

    def bases(self) -> list[torch.Tensor]:
        """The tensors whose memory the stored tensors occupy, each once (a residual that is a view
        of a larger workspace stands for that whole workspace)."""
        found: dict[int, torch.Tensor] = {}
        for tensors in self.layers.values():
            for tensor in tensors.values():
                base = tensor._base if tensor._base is not None else tensor
                found.setdefault(id(base), base)
        return list(found.values())

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {key: tensor.detach().clone() for key, tensor in tensors.items()} for name, tensors in self.layers.items()}

    def load_state_dict(self, layers: Mapping[str, Mapping[str, Any]], keep_per_rank: bool) -> None:
        keep = set(self.replicated) | (set(self.per_rank) if keep_per_rank else set())
        self.layers = {
            name: {key: tensor.clone() for key, tensor in tensors.items() if key in keep} for name, tensors in layers.items()
        }
        self.layers = {name: tensors for name, tensors in self.layers.items() if tensors}
        self._staged.clear()
