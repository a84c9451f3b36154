"""gcomp with Hugging Face Accelerate: register on the model ``accelerator.prepare`` returns.

::

    from gcomp.integrations.accelerate import register

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(accelerator, model, "powersgd", rank=4)      # before the first backward
    ...
    accelerator.backward(loss)
    ...
    print(state.stats()["compression_ratio"])
    state.close()                                                  # before the process group ends

Why not ``DistributedDataParallelKwargs(comm_hook=...)``: that field takes only PyTorch's
``DDPCommunicationHookType`` enum and silently ignores anything else, so a gcomp hook passed there
never runs. Accelerate wraps the model in ``DistributedDataParallel`` inside ``prepare``; this
function finds that wrapper (``prepare`` may return it, possibly behind ``torch.compile``) and
calls :func:`gcomp.register` on it, so state is keyed by the model's real parameter names.

Per-rank checkpoints: ``accelerator.save_state`` does not know the gcomp state; save
``state.state_dict()`` on every rank yourself (e.g. ``torch.save(..., f"{dir}/gcomp_rank{accelerator.process_index}.pt")``)
and load it after ``register`` on resume. With ``mixed_precision="fp16"`` call
``state.set_gradient_scale(accelerator.scaler.get_scale())`` before each ``accelerator.backward``.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional, Union

try:
    from accelerate import Accelerator
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gcomp.integrations.accelerate needs Hugging Face Accelerate: pip install 'gcomp[accelerate]' (or pip install accelerate)"
    ) from error

import torch
from torch.nn.parallel import DistributedDataParallel

from ..adaptive import AdaptiveConfig
from ..api import register as _register
from ..hooks import HookState

logger = logging.getLogger("gcomp.integrations.accelerate")


def find_ddp_model(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` wrapper in what ``accelerator.prepare`` returned, or None.

    ``prepare`` returns the DDP wrapper itself, or a ``torch.compile`` module around it (which keeps
    it as ``_orig_mod``). The original module cannot be mapped back: on CPU and GPU alike Accelerate
    keeps only the unwrapped model in its own lists, so pass the returned object.
    """
    for candidate in (model, getattr(model, "_orig_mod", None)):
        if isinstance(candidate, DistributedDataParallel):
            return candidate
    return None


def register(
    accelerator: Accelerator,
    model: torch.nn.Module,
    method: str = "powersgd",
    *,
    adaptive: Union[bool, AdaptiveConfig] = False,
    **options: Any,
) -> Optional[HookState]:
    """Register gcomp's ``method`` hook on the DDP model Accelerate prepared; return the state.

    ``model`` is what ``accelerator.prepare`` returned (not the module you passed to it). Call after
    ``prepare`` and before the first backward, on every process with the same arguments; ``options`` are the method's (``rank=4``, ``density=0.01``, ...), as for
    :func:`gcomp.register`.

    Returns None (with a warning) when Accelerate runs a single process: there is no gradient
    exchange to compress. Raises ``TypeError`` when several processes run but the model is not
    wrapped in ``DistributedDataParallel`` (FSDP, DeepSpeed, or a model that did not go through
    ``prepare``).
    """
    ddp = find_ddp_model(model)
    if ddp is None:
        if accelerator.num_processes <= 1:
            warnings.warn("gcomp.integrations.accelerate.register: single process, no gradients are exchanged: no hook installed", stacklevel=2)
            return None
        raise TypeError(
            f"gcomp needs the model returned by accelerator.prepare(model) (a DistributedDataParallel); got "
            f"{type(model).__name__} (distributed type {accelerator.distributed_type}; pass prepare's result, "
            "not the original module; FSDP and DeepSpeed are not supported)"
        )
    state = _register(ddp, method, adaptive=adaptive, **options)
    logger.info("gcomp %s hook installed (process %d of %d)", method, accelerator.process_index, accelerator.num_processes)
    return state
