"""Every method's whole hook path on CUDA gradients, proven on a machine without a GPU.

The gradients, parameters and process group are fakes: ``FakeTensorMode`` makes ``device="cuda"``
tensors on a CPU-only torch and raises ``FakeTensorDeviceMismatchError`` as soon as a CPU tensor
meets one (a work buffer created without the bucket's device, a checksum on the wrong device for
the backend), and the "fake" process group runs collectives on them. Fake tensors have no values,
so host reads and CUDA streams go through a :class:`~gcomp.comm.DeviceRuntime` that this test
replaces (the one seam gcomp has for them), and jobs run inline, since a tensor mode is per thread.
One quirk of fake CUDA tensors on a CPU-only build is bridged here, not in gcomp: the Python
binding of ``Tensor.copy_`` refuses them, so the test routes it to the ATen operator (same
semantics; device mismatches in arithmetic are still caught by the fake mode).

The top-k ops run through their registered fake implementations (the quantization codec through
its pure-torch twin, which FakeTensorMode traces as it is) (``gcomp.ops``), so message
sizes and devices are the real ones. What this cannot show (numerics, stream order, NCCL itself) is what ``benchmarks/gpu_check.py``
checks on a real GPU; the CPU suite checks numerics everywhere else.
"""
import time
from contextlib import nullcontext
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import gcomp
from gcomp.comm import CommWorker, DeviceRuntime

SHAPES = [(64, 32), (64,), (32, 32), (32,), (8, 32), (8,)]  # an MLP's weights and biases


class FakeDeviceRuntime(DeviceRuntime):
    """Host reads answer "finite" and "all ranks agree"; no streams."""

    def __init__(self) -> None:
        super().__init__()
        self.host_reads = 0

    def all_finite(self, tensor: torch.Tensor) -> bool:
        self.host_reads += 1
        return True

    def to_list(self, tensor: torch.Tensor) -> list[Any]:
        self.host_reads += 1
        return [0.0] * tensor.numel()  # equal checksums; an error table of zeros

    def producer_event(self, device: torch.device) -> Optional[Any]:
        return None

    def mark(self, device: torch.device) -> Any:
        return time.perf_counter()  # the real one records a CUDA timing event

    def reduction_scope(self, device: torch.device, producer: Optional[Any]):
        return nullcontext()

    def new_future(self, device: torch.device) -> torch.futures.Future:
        return torch.futures.Future()


class FakeBucket:
    """The part of ``dist.GradBucket`` gcomp reads."""

    def __init__(self, index: int, parameters: list[torch.Tensor], buffer: torch.Tensor, last: bool) -> None:
        self._index, self._parameters, self._buffer, self._last = index, parameters, buffer, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return self._parameters

    def gradients(self) -> list[torch.Tensor]:
        views, offset = [], 0
        for param in self._parameters:
            views.append(self._buffer.narrow(0, offset, param.numel()).view(param.shape))
            offset += param.numel()
        return views

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


METHODS = [
    ("allreduce", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("powersgd", {"rank": 2}),
    ("powersgd", {"rank": 2, "warm_start": False}),
    ("powersgd", {"rank": 2, "factor_dtype": "bfloat16"}),
    ("powersgd", {"rank": 2, "adaptive": gcomp.AdaptiveConfig(every_steps=2, accumulate_steps=1)}),
    ("topk", {"density": 0.1, "feedback": "ef14"}),
    ("topk", {"density": 0.1, "feedback": "ef21"}),
    ("topk", {"density": 0.1, "feedback": "ef21-sgdm"}),
    ("topk", {"density": 0.1, "feedback": "econtrol"}),
    ("topk", {"density": 0.1, "feedback": "ef21", "value_dtype": "float16"}),
    ("topk", {"density": 0.1, "feedback": "ef21", "adaptive": gcomp.AdaptiveConfig(every_steps=2, accumulate_steps=1)}),
    ("quantize", {"bits": 4, "feedback": "ef14"}),
    ("quantize", {"bits": 8, "feedback": "ef21", "rounding": "stochastic", "min_compression_rate": 1.5}),
    ("quantize", {"bits": 1, "feedback": "econtrol"}),
    ("quantize", {"bits": 2, "feedback": "ef21-sgdm", "layer_bits": {"0": 8}}),
    ("quantize", {"bits": 4, "adaptive": gcomp.AdaptiveConfig(every_steps=2, accumulate_steps=1)}),
    ("topk", {"density": 0.1, "warmup_steps": 3, "time_aware": gcomp.TimeAwareConfig()}),
    ("powersgd", {"rank": 2, "warmup_steps": 3, "time_aware": gcomp.TimeAwareConfig(trial_steps=2)}),
    ("auto", {"rank": 2, "density": 0.1, "warmup_steps": 3}),
]
assert {method for method, _ in METHODS} == set(gcomp.METHODS), "a method was added: drive it here too"


@pytest.fixture(scope="module")
def fake_process_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _drive(method: str, options: dict, dtype: torch.dtype, steps: int = 5) -> tuple[gcomp.HookState, FakeDeviceRuntime]:
    options = dict(options)
    adaptive = options.pop("adaptive", None)
    time_aware = options.pop("time_aware", None)
    options.setdefault("warmup_steps", 1)
    runtime = FakeDeviceRuntime()
    state = gcomp.METHODS[method](worker=CommWorker(runtime=runtime, inline=True), **options)
    if adaptive is not None:
        gcomp.AdaptiveController(state, adaptive)
    if time_aware is not None:
        gcomp.TimeAwareController(state, time_aware)
    hook = {"allreduce": gcomp.allreduce_hook, "fp16": gcomp.fp16_hook, "bf16": gcomp.bf16_hook,
            "powersgd": gcomp.powersgd_hook, "topk": gcomp.topk_hook, "quantize": gcomp.quantize_hook,
            "auto": gcomp.auto_hook}[method]
    with FakeTensorMode(allow_non_fake_inputs=False):
        params = [torch.nn.Parameter(torch.zeros(shape, device="cuda", dtype=dtype)) for shape in SHAPES]
        state.attach(torch.nn.ParameterList(params))
        # Two buckets, as DDP would make them (last layers first).
        buckets = [params[4:], params[:4]]
        for _ in range(steps):
            for index, members in enumerate(buckets):
                buffer = torch.randn(sum(p.numel() for p in members), device="cuda", dtype=dtype)
                future = hook(state, FakeBucket(index, members, buffer, last=index == len(buckets) - 1))
                result = future.wait()
                assert result.device.type == "cuda" and result.shape == buffer.shape and result.dtype == dtype
        for tensors in state.layer_state.values():
            for tensor in tensors.values():
                assert tensor.device.type == "cuda", (method, tensor.device)
    return state, runtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method, options", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_hook_path_keeps_every_tensor_on_the_bucket_device(fake_process_group, monkeypatch, method, options, dtype):
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, source, non_blocking=False: torch.ops.aten.copy_.default(self, source, non_blocking))
    warmup = options.get("warmup_steps", 1)
    steps = 10 if warmup > 1 else 5  # the time-aware choice: warm-up, trial steps, then its decision
    state, runtime = _drive(method, options, dtype, steps)
    stats = state.stats()
    assert stats["steps"] == steps and stats["compressed_steps"] == steps - warmup and warmup <= stats["dense_steps"] <= steps
    # Steps in which no layer was sent compressed: every step of a dense method; the warm-up, and
    # for a top-k estimator rule its dense start, of a fixed-setting top-k / quantize hook.
    if method == "allreduce":
        assert stats["dense_steps"] == steps
    elif method in ("topk", "quantize") and not ({"adaptive", "time_aware"} & set(options)):
        dense_start = method == "topk" and options.get("feedback", "ef14") != "ef14"  # quantize starts from zero
        assert stats["dense_steps"] == warmup + dense_start, (stats["dense_steps"], warmup)
    assert runtime.host_reads > 0  # the seam was used: every host read went through it
    if method in ("powersgd", "topk", "quantize") and state.time_controller is None:
        assert state.layer_state, "compressed steps left state"
    if "adaptive" in options:
        assert state.controller.decisions >= 1
    if state.time_controller is not None:
        # The fake host reads measure nothing (zeros: an infinitely fast link), so the decision,
        # made on the fake GPU after the trial steps, sends every layer dense.
        assert stats["time_aware"]["decided"] and stats["time_aware"]["decision"]["compressed_layers"] == []


def test_a_cpu_tensor_meeting_the_fake_gpu_is_caught(fake_process_group):
    """The test above can fail: a hook that builds a work buffer on the CPU is caught."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with FakeTensorMode():
        bucket = torch.zeros(8, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.empty(8).copy_(bucket).add_(bucket)


def test_every_tensor_factory_in_gcomp_names_its_device():
    """Static check: a factory call (``torch.empty``, ``zeros``, ``randn``, ...) in gcomp's sources
    must pass ``device=`` (tensors derived with ``new_*`` / ``*_like`` carry theirs)."""
    import ast
    import pathlib

    factories = {"empty", "zeros", "ones", "full", "tensor", "randn", "rand", "randint", "arange", "linspace", "as_tensor", "Generator", "eye"}
    root = pathlib.Path(gcomp.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in factories
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(keyword.arg == "device" for keyword in node.keywords)
            ):
                missing.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}")
    assert not missing, "tensor factories without a device: " + ", ".join(missing)
