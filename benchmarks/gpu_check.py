"""One-shot check of gcomp on a CUDA machine: kernels, every method in real DDP, speed, memory.

Set up and run (from the repository root, on a machine with at least one NVIDIA GPU; about 3
minutes on one H200, at most 5):

    python3 -m venv .venv-gpu && source .venv-gpu/bin/activate
    pip install torch numpy setuptools wheel ninja      # a CUDA build of torch (the default on Linux)
    pip install cupy-cuda12x                             # optional: also checks the NVRTC path
                                                         # (cupy-cuda13x for a CUDA 13 torch)
    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .   # gcomp._C with CUDA kernels
    python benchmarks/gpu_check.py --json gpu_check.json

What it checks (each section records PASS / FAIL with the traceback / SKIP with the reason, and
carries on; the exit code is 1 if anything failed):

kernels    the CUDA paths of the top-k pack/unpack ops (the compiled extension, the cupy/NVRTC
           build of the same .cu, and the pure-torch twin on CUDA) against the CPU op, bit for bit:
           every value dtype, float64 input, index and bitmap layers, one element, odd sizes,
           several layers, NaN/inf/-0/subnormal/tied values, several messages, every out dtype,
           and malformed messages (ValueError, out untouched).
ddp        every method (gcomp.METHODS; top-k with each feedback rule; adaptive=True for PowerSGD
           and top-k) in DDP on CUDA gradients over NCCL (world size 1): settings that must equal
           plain DDP are compared with it, realistic settings are compared with the same run on CPU
           (gloo), and AMP float16 training with torch.amp.GradScaler (including an overflow step)
           is compared with plain DDP under the same scaler. Then 2 ranks sharing one GPU over gloo
           with CUDA tensors (NCCL refuses two ranks on one GPU: "Duplicate GPU detected"), against
           plain DDP; a crash there is reported (gloo's CUDA all_gather, pytorch#152645).
perf       pack/unpack throughput against a device memcpy of the same bytes (torch.cuda.Event
           timing), the step time of PowerSGD and top-k against plain DDP on a ~13M-parameter
           transformer, and each method's peak CUDA memory over plain DDP.

Without a CUDA device it prints "no CUDA device" and exits 0.
"""
from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda"  # the kernel comparisons' device (a CPU dry run of this script's logic sets "cpu")
BUFFER_DTYPES = VALUE_DTYPES + [torch.float64]


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class Record:
    section: str
    name: str
    status: str  # PASS, FAIL, SKIP, INFO
    detail: str = ""
    metrics: dict = field(default_factory=dict)


class Report:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.environment: dict[str, Any] = {}
        self.current = "start-up"  # the check running now (named if the time limit is reached)

    def add(self, section: str, name: str, status: str, detail: str = "", **metrics: Any) -> None:
        record = Record(section, name, status, detail, metrics)
        self.records.append(record)
        line = f"[{status:4}] {section:8} {name}"
        if detail and status != "FAIL":
            line += f"  -- {detail.splitlines()[0][:160]}"
        print(line, flush=True)
        if status == "FAIL":
            print("       " + detail.replace("\n", "\n       "), flush=True)

    def check(self, section: str, name: str, function: Callable[[], Any]) -> Any:
        """Runs one check; an exception is a FAIL with its traceback, and the run goes on."""
        started = time.perf_counter()
        previous, self.current = self.current, f"{section}: {name}"
        try:
            result = function()
        except Skip as skip:
            self.add(section, name, "SKIP", str(skip))
            return None
        except Exception:
            self.add(section, name, "FAIL", traceback.format_exc())
            return None
        finally:
            self.current = previous
        detail, metrics = (result if isinstance(result, tuple) else (result or "", {}))
        public = {key: value for key, value in metrics.items() if not key.startswith("_")}  # "_": objects
        self.add(section, name, "PASS", detail, seconds=round(time.perf_counter() - started, 3), **public)
        return metrics

    @property
    def failed(self) -> bool:
        return any(record.status == "FAIL" for record in self.records)


class Skip(Exception):
    pass


def _synchronize() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# Kernels: every CUDA path against the CPU op, bit for bit
# ------------------------------------------------------------------------------------------------

# (offsets, numels, ks): bit-packed and bitmap layers, one element, odd sizes, several tiles
LAYOUTS = [
    ([], [], []),
    ([0], [1], [1]),
    ([0, 7, 1007], [7, 1000, 9001], [3, 10, 9000]),
    ([5, 0], [4100, 5], [2000, 5]),
    ([0, 3000, 3001, 23001], [3000, 1, 20000, 1 << 20], [1500, 1, 17, 10486]),
]


def special_buffer(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values plus NaN, +-inf, -0, subnormals and ties (the selection rule's hard cases)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    if n > 64:
        x[::97] = 0.5  # ties
        x[3::101] = -0.5
        x[5] = float("nan")
        x[7] = float("inf")
        x[11] = float("-inf")
        x[13] = -0.0
        x[17::211] = 1e-41 if dtype != torch.float64 else 1e-310  # subnormal in float32 / float64
        x[19::223] = 3e-8  # subnormal in float16
    return x.to(dtype)


def cpu_codec():
    """The CPU op that defines the expected bytes: compiled when built, else the torch twin."""
    from gcomp import ops
    from gcomp.compress import sparse as reference

    if ops.native_backend("cpu") == "compiled-cpu":
        return "compiled-cpu", (torch.ops.gcomp.topk_pack, torch.ops.gcomp.sparse_unpack_add_, torch.ops.gcomp.sparse_unpack)
    return "torch", (reference.topk_pack, reference.sparse_unpack_add_, reference.sparse_unpack)


def cuda_codecs() -> dict[str, Optional[tuple]]:
    """Every CUDA implementation, called directly (not through the routing in gcomp.ops)."""
    from gcomp import native_cupy, ops
    from gcomp.compress import sparse as reference

    codecs: dict[str, Any] = {}
    if ops.native_available() and ops._compiled_kernels_for(torch.device("cuda")):
        codecs["compiled-cuda"] = (torch.ops.gcomp.topk_pack, torch.ops.gcomp.sparse_unpack_add_, torch.ops.gcomp.sparse_unpack)
    else:
        codecs["compiled-cuda"] = None
    if native_cupy.available("cuda"):
        codecs["cupy-nvrtc"] = (native_cupy.topk_pack, native_cupy.sparse_unpack_add_, native_cupy.sparse_unpack)
    else:
        codecs["cupy-nvrtc"] = None
    codecs["torch"] = (reference.topk_pack, reference.sparse_unpack_add_, reference.sparse_unpack)
    return codecs


def check_codec(codec: tuple, expected: tuple, quick: bool) -> tuple[str, dict]:
    pack, unpack_add, unpack = codec
    pack_cpu, unpack_add_cpu, unpack_cpu = expected
    cases = 0
    layouts = LAYOUTS[:-1] if quick else LAYOUTS  # the torch twin is slow on the 1M-element layer
    for seed, (offsets, numels, ks) in enumerate(layouts):
        extent = max([o + n for o, n in zip(offsets, numels)] + [1])
        for buffer_dtype in BUFFER_DTYPES:
            buffer = special_buffer(extent, buffer_dtype, seed)
            for value_dtype in VALUE_DTYPES:
                message = pack_cpu(buffer, offsets, numels, ks, value_dtype)
                got = pack(buffer.to(DEVICE), offsets, numels, ks, value_dtype)
                _synchronize()
                assert got.device.type == torch.device(DEVICE).type and same_bits(got, message), f"pack {buffer_dtype}->{value_dtype} layout {seed}"
                messages = torch.stack([message, pack_cpu(-buffer.flip(0), offsets, numels, ks, value_dtype), message])
                values, indices = unpack_cpu(messages, offsets, numels, ks, value_dtype)
                got_values, got_indices = unpack(messages.to(DEVICE), offsets, numels, ks, value_dtype)
                assert same_bits(got_values, values) and same_bits(got_indices, indices), f"unpack {value_dtype} layout {seed}"
                got_values, got_indices = unpack(message.to(DEVICE), offsets, numels, ks, value_dtype)
                assert same_bits(got_values, values[0]) and same_bits(got_indices, indices[0])
                for out_dtype in BUFFER_DTYPES:
                    for scale in (1.0, 0.37):
                        out = special_buffer(extent, out_dtype, seed + 100)
                        out_cuda = out.to(DEVICE)
                        unpack_add_cpu(out, messages, offsets, numels, ks, value_dtype, scale)
                        unpack_add(out_cuda, messages.to(DEVICE), offsets, numels, ks, value_dtype, scale)
                        assert same_bits(out_cuda, out), f"unpack_add {value_dtype}->{out_dtype} scale {scale} layout {seed}"
                        cases += 1
    # malformed: an index beyond numel in a bit-packed layer must raise before touching out
    offsets, numels, ks = [0, 1000], [1000, 3000], [10, 20]
    message = pack_cpu(torch.randn(4000), offsets, numels, ks, torch.float32)
    from gcomp.compress.sparse import sparse_message_layout

    section = sparse_message_layout(numels, ks, torch.float32).layers[0]
    message[section.index_offset : section.index_offset + section.index_payload_bytes] = 0xFF
    out = torch.zeros(4000, device=DEVICE)
    try:
        unpack_add(out, message.to(DEVICE), offsets, numels, ks, torch.float32, 1.0)
    except ValueError:
        pass
    else:
        raise AssertionError("a corrupted message was accepted")
    assert not out.any(), "a rejected message modified out"
    return f"{cases} unpack cases and their packs bitwise equal", {"cases": cases}


# ------------------------------------------------------------------------------------------------
# DDP: every method on CUDA gradients
# ------------------------------------------------------------------------------------------------


def make_model(seed: int = 0) -> torch.nn.Module:
    """An MLP with matrices PowerSGD and top-k compress and vectors they keep dense."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 16),
    )


def make_batch(rank: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(32, 64, generator=generator).to(device), torch.randn(32, 16, generator=generator).to(device)


def adaptive_config():
    import gcomp

    return gcomp.AdaptiveConfig(every_steps=3, accumulate_steps=2)  # a decision inside the run


TINY_RATE = 1e-6  # compress every layer, however small (makes "full rank == mean" meaningful)

# name -> (method, options, tolerance against plain DDP); these settings must equal the mean
EXACT_SETTINGS = {
    "allreduce": ("allreduce", {}, 0.0),
    "fp16": ("fp16", {}, 2e-3),
    "bf16": ("bf16", {}, 1.6e-2),
    "powersgd full rank": ("powersgd", {"rank": 128, "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-3),
    "topk ef14 density 1": ("topk", {"density": 1.0, "feedback": "ef14", "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
    "topk ef21 density 1": ("topk", {"density": 1.0, "feedback": "ef21", "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
    "topk ef21-sgdm momentum 0 density 1": (
        "topk", {"density": 1.0, "feedback": "ef21-sgdm", "momentum": 0.0, "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
    "topk econtrol density 1": (
        "topk", {"density": 1.0, "feedback": "econtrol", "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
    "quantize ef14 32 bits": ("quantize", {"bits": 32, "feedback": "ef14", "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
    "quantize ef21 32 bits": ("quantize", {"bits": 32, "feedback": "ef21", "warmup_steps": 0, "min_compression_rate": TINY_RATE}, 1e-6),
}
# name -> (method, options, adaptive, tolerance of CUDA against CPU); lossy settings
LOSSY_SETTINGS = {
    "powersgd rank 2": ("powersgd", {"rank": 2, "warmup_steps": 1}, False, 1e-3),
    "powersgd rank 2 adaptive": ("powersgd", {"rank": 2, "warmup_steps": 0}, True, 1e-3),
    "topk ef14": ("topk", {"density": 0.05, "feedback": "ef14", "warmup_steps": 1}, False, 5e-2),
    "topk ef21": ("topk", {"density": 0.05, "feedback": "ef21", "warmup_steps": 1}, False, 5e-2),
    "topk ef21-sgdm": ("topk", {"density": 0.05, "feedback": "ef21-sgdm", "warmup_steps": 1}, False, 5e-2),
    "topk econtrol": ("topk", {"density": 0.05, "feedback": "econtrol", "warmup_steps": 1}, False, 5e-2),
    "topk ef21 float16 values": ("topk", {"density": 0.05, "value_dtype": "float16", "warmup_steps": 0}, False, 5e-2),
    "topk ef21 adaptive": ("topk", {"density": 0.05, "warmup_steps": 0}, True, 5e-2),
    "quantize 4 bits ef14": ("quantize", {"bits": 4, "feedback": "ef14"}, False, 5e-2),
    "quantize 8 bits ef21 stochastic": ("quantize", {"bits": 8, "feedback": "ef21", "rounding": "stochastic"}, False, 5e-2),
    "quantize 4 bits adaptive": ("quantize", {"bits": 4}, True, 5e-2),
}
STEPS = 6


def train(
    device: torch.device,
    method: Optional[str],
    options: dict,
    adaptive: bool = False,
    process_group=None,
    rank: int = 0,
    steps: int = STEPS,
    amp: bool = False,
    overflow_step: Optional[int] = None,
) -> dict:
    """Trains ``make_model()`` under DDP; returns each step's averaged gradients (flattened, CPU)."""
    import gcomp
    from torch.nn.parallel import DistributedDataParallel

    model = make_model().to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=process_group, bucket_cap_mb=0.1
    )
    state = None
    if method is not None:
        extra = {"adaptive": adaptive_config()} if adaptive else {}
        state = gcomp.register(ddp, method, process_group=process_group, **extra, **options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12) if amp else None
    gradients, scales = [], []
    try:
        for step in range(steps):
            x, y = make_batch(rank, step, device)
            optimizer.zero_grad()
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.mse_loss(ddp(x).float(), y)
            if step == overflow_step:
                loss = loss * float("inf")
            if scaler is not None:
                if state is not None:
                    state.set_gradient_scale(scaler.get_scale())
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                gradients.append(torch.cat([p.grad.flatten().float() for p in ddp.parameters()]).cpu())
                scaler.step(optimizer)
                scaler.update()
                scales.append(scaler.get_scale())
            else:
                loss.backward()
                gradients.append(torch.cat([p.grad.flatten().float() for p in ddp.parameters()]).cpu())
                optimizer.step()
        grad_devices = {p.grad.device.type for p in ddp.parameters()}
        stats = state.stats() if state is not None else None
    finally:
        if state is not None:
            state.close()
    assert grad_devices == {device.type}, f"gradients ended up on {grad_devices}"
    return {"gradients": gradients, "scales": scales, "stats": stats}


def compare_runs(got: dict, expected: dict, tolerance: float, skip_steps: tuple = ()) -> float:
    worst = 0.0
    for step, (a, b) in enumerate(zip(got["gradients"], expected["gradients"])):
        if step in skip_steps:
            continue
        assert torch.isfinite(a).all(), f"non-finite gradient at step {step}"
        error = relative_error(a, b)
        worst = max(worst, error)
        assert error <= tolerance, f"step {step}: relative error {error:.3g} > {tolerance:g}"
    return worst


@contextmanager
def nccl_world_of_one():
    import torch.distributed as dist

    store_file = tempfile.NamedTemporaryFile(prefix="gcomp-gpu-check-", delete=False).name
    os.unlink(store_file)
    dist.init_process_group("nccl", init_method=f"file://{store_file}", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        yield dist.new_group(backend="gloo")  # for the same runs on CPU
    finally:
        dist.destroy_process_group()


def ddp_checks(report: Report) -> None:
    import gcomp

    cuda = torch.device("cuda:0")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report.add("ddp", "methods", "INFO", f"gcomp.METHODS = {sorted(gcomp.METHODS)}")
    with nccl_world_of_one() as gloo:
        plain = report.check("ddp", "plain DDP on CUDA over NCCL", lambda: ("", {"_run": train(cuda, None, {})}))
        if plain is None:
            return
        plain_run = plain["_run"]
        for name, (method, options, tolerance) in EXACT_SETTINGS.items():
            report.check(
                "ddp",
                f"nccl w=1 {name} == plain DDP (tol {tolerance:g})",
                lambda m=method, o=options, t=tolerance: (
                    "", {"max_relative_error": compare_runs(train(cuda, m, o), plain_run, t)}
                ),
            )
        for name, (method, options, adaptive, tolerance) in LOSSY_SETTINGS.items():

            def lossy(m=method, o=options, a=adaptive, t=tolerance):
                on_cuda = train(cuda, m, o, adaptive=a)
                on_cpu = train(torch.device("cpu"), m, o, adaptive=a, process_group=gloo)
                error = compare_runs(on_cuda, on_cpu, t)
                ratio = on_cuda["stats"].get("compression_ratio") if on_cuda["stats"] else None
                return "", {"max_relative_error_vs_cpu": error, "compression_ratio": ratio}

            report.check("ddp", f"nccl w=1 {name} == same run on CPU (tol {tolerance:g})", lossy)

        plain_amp = report.check(
            "ddp", "plain DDP with AMP float16 + GradScaler, overflow at step 2",
            lambda: ("", {"_run": train(cuda, None, {}, amp=True, overflow_step=2)}),
        )
        if plain_amp is not None:
            plain_amp_run = plain_amp["_run"]
            for name in ("allreduce", "fp16", "powersgd full rank", "topk ef14 density 1", "topk ef21 density 1", "topk econtrol density 1"):
                method, options, tolerance = EXACT_SETTINGS[name]

                def amp(m=method, o=options, t=max(EXACT_SETTINGS[name][2], 1e-5)):
                    run = train(cuda, m, o, amp=True, overflow_step=2)
                    assert run["scales"] == plain_amp_run["scales"], f"loss scales {run['scales']} != {plain_amp_run['scales']}"
                    return "", {"max_relative_error": compare_runs(run, plain_amp_run, t, skip_steps=(2,))}

                report.check("ddp", f"nccl w=1 AMP+GradScaler {name} == plain DDP", amp)
    two_ranks_on_one_gpu(report)


def _gloo_worker(rank: int, world: int, store: str, out_path: str, device_name: str) -> None:
    """One rank of the 2-process gloo run on a shared GPU; writes its results as JSON."""
    import torch.distributed as dist

    results: dict[str, Any] = {}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        device = torch.device(device_name)
        torch.backends.cuda.matmul.allow_tf32 = False
        plain = train(device, None, {}, rank=rank)
        settings = {name: (m, o, False, t) for name, (m, o, t) in EXACT_SETTINGS.items()}
        settings.update({f"{name} (runs)": (m, o, a, None) for name, (m, o, a, _) in LOSSY_SETTINGS.items()})
        for name, (method, options, adaptive, tolerance) in settings.items():
            try:
                run = train(device, method, options, adaptive=adaptive, rank=rank)
                digest = hashlib.sha256(run["gradients"][-1].numpy().tobytes()).hexdigest()  # replicated?
                if tolerance is None:
                    finite = all(bool(torch.isfinite(g).all()) for g in run["gradients"])
                    results[name] = {"ok": finite, "digest": digest, "detail": "finite" if finite else "non-finite"}
                else:
                    error = compare_runs(run, plain, max(tolerance, 1e-6))  # 2 ranks: rounding order
                    results[name] = {"ok": True, "digest": digest, "detail": f"max relative error {error:.3g}"}
            except Exception:
                results[name] = {"ok": False, "detail": traceback.format_exc()}
    finally:
        with open(out_path, "w") as stream:
            json.dump(results, stream)
        dist.destroy_process_group()


def two_ranks_on_one_gpu(report: Report, device_name: str = "cuda:0") -> None:
    report.add("ddp", "2 ranks on one GPU over NCCL", "SKIP", "NCCL refuses two ranks on one device (Duplicate GPU detected)")
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gcomp-gpu-check-") as directory:
        store = os.path.join(directory, "store")
        outputs = [os.path.join(directory, f"rank{r}.json") for r in range(2)]
        processes = [context.Process(target=_gloo_worker, args=(r, 2, store, outputs[r], device_name)) for r in range(2)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + 120
        for process in processes:
            process.join(max(1.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        codes = [process.exitcode for process in processes]
        results = []
        for path in outputs:
            try:
                with open(path) as stream:
                    results.append(json.load(stream))
            except (OSError, ValueError):
                results.append(None)
        if any(result is None for result in results):
            report.add(
                "ddp", "gloo 2 ranks on one GPU", "FAIL",
                f"a rank died or hung (exit codes {codes}); gloo's CUDA collectives are known to crash "
                "in some versions (pytorch#152645)",
            )
            return
        for name in results[0]:
            entries = [result.get(name, {"ok": False, "detail": "missing"}) for result in results]
            status = "PASS" if all(entry["ok"] for entry in entries) else "FAIL"
            detail = "; ".join(f"rank {r}: {entry['detail']}" for r, entry in enumerate(entries))
            if status == "PASS" and len({entry.get("digest") for entry in entries}) != 1:
                status, detail = "FAIL", detail + "; the ranks' averaged gradients differ (must be bitwise equal)"
            report.add("ddp", f"gloo w=2 one GPU {name}" + (" == plain DDP" if "(runs)" not in name else ""), status, detail)
        if any(code != 0 for code in codes):
            report.add("ddp", "gloo 2 ranks on one GPU: exit", "FAIL", f"exit codes {codes} (pytorch#152645?)")


# ------------------------------------------------------------------------------------------------
# Performance
# ------------------------------------------------------------------------------------------------


def cuda_time(function: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``function`` on the current stream."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_throughput(report: Report, codecs: dict) -> None:
    n_layers, numel = 16, 1 << 20  # 16 layers of 1M float32: 64 MiB
    numels = [numel] * n_layers
    offsets = [layer * numel for layer in range(n_layers)]
    buffer = torch.randn(n_layers * numel, device="cuda")
    copy_target = torch.empty_like(buffer)
    memcpy_ms = cuda_time(lambda: copy_target.copy_(buffer))
    bytes_moved = buffer.numel() * buffer.element_size()
    report.add("perf", "device memcpy 64 MiB", "INFO", f"{memcpy_ms:.3f} ms", ms=memcpy_ms, gb_per_s=2 * bytes_moved / memcpy_ms / 1e6)
    for name, codec in codecs.items():
        if codec is None:
            continue
        pack, unpack_add, _ = codec
        repeats = 3 if name == "torch" else 20
        for density in (0.01, 0.1):
            ks = [max(1, round(density * numel))] * n_layers

            def measure(pack=pack, unpack_add=unpack_add, ks=ks, density=density, repeats=repeats):
                pack_ms = cuda_time(lambda: pack(buffer, offsets, numels, ks, torch.float32), repeats, 1)
                message = pack(buffer, offsets, numels, ks, torch.float32)
                messages = torch.stack([message] * 8)
                out = torch.zeros_like(buffer)
                unpack_ms = cuda_time(lambda: unpack_add(out, messages, offsets, numels, ks, torch.float32, 0.125), repeats, 1)
                return (
                    f"pack {pack_ms:.3f} ms ({pack_ms / memcpy_ms:.1f}x memcpy), unpack 8 msgs {unpack_ms:.3f} ms",
                    {"pack_ms": pack_ms, "unpack8_ms": unpack_ms, "pack_over_memcpy": pack_ms / memcpy_ms,
                     "pack_input_gb_per_s": bytes_moved / pack_ms / 1e6},
                )

            report.check("perf", f"{name} pack/unpack 16x1M float32 density {density}", measure)


class TinyTransformer(torch.nn.Module):
    """About 13M parameters: 4 encoder layers, d_model 512, a 1024-token vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(1024, 512)
        layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = torch.nn.Linear(512, 1024)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


STEP_SETTINGS = {
    "plain DDP": (None, {}, False),
    "allreduce": ("allreduce", {}, False),
    "fp16": ("fp16", {}, False),
    "bf16": ("bf16", {}, False),
    "powersgd rank 4": ("powersgd", {"rank": 4, "warmup_steps": 0}, False),
    "powersgd rank 4 adaptive": ("powersgd", {"rank": 4, "warmup_steps": 0}, True),
    "topk 1% ef21": ("topk", {"density": 0.01, "feedback": "ef21", "warmup_steps": 0}, False),
    "topk 1% ef14": ("topk", {"density": 0.01, "feedback": "ef14", "warmup_steps": 0}, False),
    "topk 1% ef21-sgdm": ("topk", {"density": 0.01, "feedback": "ef21-sgdm", "warmup_steps": 0}, False),
    "topk 1% econtrol": ("topk", {"density": 0.01, "feedback": "econtrol", "warmup_steps": 0}, False),
    "topk 1% ef21 adaptive": ("topk", {"density": 0.01, "warmup_steps": 0}, True),
}


def step_times(report: Report) -> None:
    import gcomp
    from torch.nn.parallel import DistributedDataParallel

    baseline: dict[str, float] = {}
    with nccl_world_of_one():
        for name, (method, options, adaptive) in STEP_SETTINGS.items():

            def measure(method=method, options=options, adaptive=adaptive):
                model = TinyTransformer().cuda()
                params = sum(p.numel() for p in model.parameters())
                ddp = DistributedDataParallel(model, device_ids=[0])
                extra = {"adaptive": adaptive_config()} if adaptive else {}
                state = gcomp.register(ddp, method, **extra, **options) if method else None
                optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
                generator = torch.Generator(device="cuda").manual_seed(0)
                tokens = torch.randint(0, 1024, (16, 128), device="cuda", generator=generator)
                try:
                    def step():
                        optimizer.zero_grad(set_to_none=True)
                        logits = ddp(tokens)
                        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
                        optimizer.step()

                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    start_memory = torch.cuda.memory_allocated()
                    times = []
                    for _ in range(15):
                        torch.cuda.synchronize()
                        started = time.perf_counter()
                        step()
                        torch.cuda.synchronize()
                        times.append(1e3 * (time.perf_counter() - started))
                    peak = torch.cuda.max_memory_allocated()
                    stats = state.stats() if state is not None else {}
                finally:
                    if state is not None:
                        state.close()
                ms = statistics.median(times)
                if method is None:
                    baseline.update(ms=ms, peak=peak)
                metrics = {
                    "params": params, "step_ms": ms, "peak_mib": peak / 2**20, "start_mib": start_memory / 2**20,
                    "step_over_plain": ms / baseline["ms"] if baseline else None,
                    "peak_over_plain_mib": (peak - baseline["peak"]) / 2**20 if baseline else None,
                    "compression_ratio": stats.get("compression_ratio"),
                }
                return f"{ms:.2f} ms/step, peak {peak / 2**20:.0f} MiB", metrics

            report.check("perf", f"step {name}", measure)
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def print_table(report: Report) -> None:
    print("\n" + "=" * 110)
    print(f"{'section':8} {'status':6} {'check':62} key numbers")
    print("-" * 110)
    for record in report.records:
        keys = ("max_relative_error", "max_relative_error_vs_cpu", "cases", "pack_ms", "unpack8_ms", "pack_over_memcpy",
                "step_ms", "step_over_plain", "peak_mib", "peak_over_plain_mib", "compression_ratio", "ms")
        numbers = ", ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in record.metrics.items()
            if key in keys and value is not None
        )
        print(f"{record.section:8} {record.status:6} {record.name[:62]:62} {numbers}")
    counts = {status: sum(r.status == status for r in report.records) for status in ("PASS", "FAIL", "SKIP")}
    print("-" * 110)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every record (and the environment) to this file")
    parser.add_argument("--skip-perf", action="store_true", help="correctness checks only")
    parser.add_argument("--time-limit", type=float, default=285.0, help="seconds before giving up on a hung check")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (gcomp's CPU paths are covered by the test suite)")
        if args.json:
            with open(args.json, "w") as stream:
                json.dump({"cuda": False, "records": []}, stream, indent=1)
        return 0

    report = Report()
    started = time.perf_counter()
    watchdog = threading.Timer(args.time_limit, _give_up, args=(report, args.json))
    watchdog.daemon = True
    watchdog.start()
    environment: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "devices": torch.cuda.device_count(),
    }
    try:
        import gcomp
        from gcomp import ops

        environment["gcomp"] = gcomp.__version__

        environment["backend_cpu"] = ops.native_backend("cpu")
        environment["backend_cuda"] = ops.native_backend("cuda")
        try:
            import cupy

            environment["cupy"] = cupy.__version__
        except Exception as error:
            environment["cupy"] = f"not usable ({type(error).__name__})"
    except Exception:
        report.add("setup", "import gcomp", "FAIL", traceback.format_exc())
        environment["error"] = "import failed"
    report.environment = environment
    report.add("setup", "environment", "INFO", json.dumps(environment))

    if not report.failed:
        codecs = report.check("kernels", "CUDA kernels against the CPU op", lambda: kernel_checks(report)) or {}
        codecs = codecs.get("_codecs", {})
        report.check("kernels", f"gcomp.ops on CUDA (backend {environment.get('backend_cuda')})", ops_smoke)
        report.check("ddp", "all DDP checks", lambda: ddp_checks(report))
        if not args.skip_perf:
            report.check("perf", "kernel throughput", lambda: kernel_throughput(report, codecs))
            report.check("perf", "step time and memory", lambda: step_times(report))
    watchdog.cancel()
    report.add("setup", "total time", "INFO", f"{time.perf_counter() - started:.1f} s")
    finish(report, args.json)
    return 1 if report.failed else 0


def finish(report: Report, json_path: Optional[str]) -> None:
    print_table(report)
    if json_path:
        with open(json_path, "w") as stream:
            json.dump({"cuda": True, "environment": report.environment, "records": [asdict(r) for r in report.records]},
                      stream, indent=1, default=str)


def _give_up(report: Report, json_path: Optional[str]) -> None:
    """A check hung (a deadlocked collective, say): report what ran, where it hangs, and exit."""
    report.add("setup", f"time limit reached during: {report.current}", "FAIL", "stacks of every thread follow on stderr")
    faulthandler.dump_traceback(all_threads=True)
    finish(report, json_path)
    sys.stdout.flush()
    os._exit(2)


def kernel_checks(report: Report) -> tuple[str, dict]:
    """Every CUDA implementation against the CPU op; returns them for the throughput section."""
    codecs = cuda_codecs()
    expected_name, expected = cpu_codec()
    reasons = {
        "compiled-cuda": "gcomp._C has no CUDA kernels (built without nvcc or against a CPU torch?)",
        "cupy-nvrtc": "cupy is not installed or cannot use the GPU",
    }
    for name, codec in codecs.items():
        if codec is None:
            report.add("kernels", f"{name} == {expected_name}", "SKIP", reasons[name])
            continue
        report.check(
            "kernels", f"{name} == {expected_name} (bitwise)",
            lambda codec=codec, name=name: check_codec(codec, expected, quick=name == "torch"),
        )
    return "", {"_codecs": codecs}


def ops_smoke() -> str:
    """The routed ops (what the hooks call) on CUDA: output device and a round trip."""
    from gcomp import ops

    x = torch.randn(10000, device="cuda")
    message = ops.topk_pack(x, [0, 5000], [5000, 5000], [50, 4000], torch.float32)
    assert message.is_cuda
    out = torch.zeros_like(x)
    ops.sparse_unpack_add_(out, message, [0, 5000], [5000, 5000], [50, 4000], torch.float32)
    values, indices = ops.sparse_unpack(message, [0, 5000], [5000, 5000], [50, 4000], torch.float32)
    assert values.is_cuda and indices.is_cuda and torch.equal(out[indices], x[indices])
    return f"backend {ops.native_backend('cuda')}"


if __name__ == "__main__":
    sys.exit(main())
