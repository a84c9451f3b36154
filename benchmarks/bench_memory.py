"""Memory each method keeps beyond plain DDP: a census of the tensors its state holds.

    python benchmarks/bench_memory.py --json benchmarks/results/memory.json

Runs the main job's model (the "small" CharLM, 3.3 M parameters) for a few steps under DDP with
each method (one gloo rank on the CPU: the census counts tensors, so one rank shows what every
rank holds) and reports, per gradient byte, what the hook state keeps from step to step
(``state``: residuals, estimates, momenta, warm-start factors) and the work buffers it keeps to
avoid re-allocation (``workspace``), from ``state.memory_bytes()``. Transient per-step buffers
(messages, the float32 copy of a half-precision bucket) are not in the census; on a GPU,
``benchmarks/gpu_check.py`` measures peak memory over plain DDP, transients included.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.examples.charlm import CharLM, CharLMConfig

CONFIGS: list[tuple[str, str, dict]] = [
    ("allreduce", "allreduce", {}),
    ("fp16", "fp16", {}),
    ("powersgd rank 4", "powersgd", {"rank": 4}),
    ("powersgd rank 4, no error feedback", "powersgd", {"rank": 4, "error_feedback": False}),
    ("topk 1% EF14", "topk", {"density": 0.01, "feedback": "ef14"}),
    ("topk 1% EF21", "topk", {"density": 0.01, "feedback": "ef21"}),
    ("topk 1% EF21-SGDM", "topk", {"density": 0.01, "feedback": "ef21-sgdm"}),
    ("topk 1% EControl", "topk", {"density": 0.01, "feedback": "econtrol"}),
    # The controller's checkpoint share: outside its profiling window, and inside it (the summed
    # profiled gradients of the window are saved so that a resume decides bit-identically).
    ("powersgd rank 4, adaptive", "powersgd", {"rank": 4, "adaptive": gcomp.AdaptiveConfig(every_steps=100)}),
    ("powersgd rank 4, adaptive, in window", "powersgd", {"rank": 4, "adaptive": gcomp.AdaptiveConfig(every_steps=10)}),
    ("topk 1% EF21, adaptive", "topk", {"density": 0.01, "feedback": "ef21", "adaptive": gcomp.AdaptiveConfig(every_steps=100)}),
    ("topk 1% EF21, adaptive, in window", "topk", {"density": 0.01, "feedback": "ef21", "adaptive": gcomp.AdaptiveConfig(every_steps=10)}),
    ("quantize 4 bits EF14", "quantize", {"bits": 4, "feedback": "ef14"}),
    ("quantize 4 bits EF21", "quantize", {"bits": 4, "feedback": "ef21"}),
]


def checkpoint_bytes(state_dict: dict) -> int:
    """Bytes of ``torch.save(state_dict)``: what each rank writes per checkpoint."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


def census(method: str, options: dict, steps: int = 3) -> dict:
    torch.manual_seed(0)
    model = CharLM(CharLMConfig.preset("small"))
    ddp = DistributedDataParallel(model)
    state = gcomp.register(ddp, method, warmup_steps=1, **options)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(0, 256, (4, 65), device="cpu")
    for _ in range(steps):
        ddp.zero_grad()
        logits = ddp(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    memory = state.memory_bytes()
    saved = state.state_dict()
    controller = saved.get("controller") or {}
    state.close()
    return {
        "gradient_bytes": gradient_bytes,
        **memory,
        "checkpoint_bytes": checkpoint_bytes(saved),
        "controller_checkpoint_bytes": checkpoint_bytes(controller) if controller else 0,
        "checkpoint_per_gradient_byte": checkpoint_bytes(saved) / gradient_bytes,
        "state_per_gradient_byte": memory["state"] / gradient_bytes,
        "workspace_per_gradient_byte": memory["workspace"] / gradient_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'store')}", rank=0, world_size=1)
        rows = {label: census(method, options) for label, method, options in CONFIGS}
        dist.destroy_process_group()
    print("| method | state / gradient bytes | workspace / gradient bytes | state MB | checkpoint MB | checkpoint / gradient bytes | controller's share MB |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['state_per_gradient_byte']:.3f} | {row['workspace_per_gradient_byte']:.3f} | {row['state'] / 1e6:.2f} | "
              f"{row['checkpoint_bytes'] / 1e6:.2f} | {row['checkpoint_per_gradient_byte']:.3f} | {row['controller_checkpoint_bytes'] / 1e6:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
