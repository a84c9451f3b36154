"""The DDP comm hooks: one adapter (``base``) and one module per method, each with its own hook."""
from .auto import AutoState, auto_hook
from .base import HookState
from .baseline import AllreduceState, BF16State, FP16State, allreduce_hook, bf16_hook, fp16_hook
from .powersgd import PowerSGDState, powersgd_hook
from .quantize import QuantizeState, quantize_hook
from .topk import TopKState, topk_hook

__all__ = [
    "AllreduceState",
    "AutoState",
    "auto_hook",
    "BF16State",
    "FP16State",
    "HookState",
    "PowerSGDState",
    "QuantizeState",
    "TopKState",
    "allreduce_hook",
    "bf16_hook",
    "fp16_hook",
    "powersgd_hook",
    "quantize_hook",
    "topk_hook",
]
