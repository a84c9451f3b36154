"""Step time and bytes per step of DDP hooks, side by side in one run (2 ranks, gloo, CPU).

Methods: DDP without a hook, PyTorch's ``powerSGD_hook``, gcomp PowerSGD at the same rank, gcomp
bf16 (PyTorch's ``bf16_compress_hook`` refuses to run on CPU) and gcomp's plain allreduce. All
models live side by side in the same processes and are stepped in interleaved rounds, so machine
noise hits every method alike; the table reports medians and ratios measured in this one run.

PyTorch's hook deadlocks on gloo when a model spans two buckets, so every method runs with one
bucket (``--bucket-cap-mb 100``); gcomp is also measured with DDP's default buckets (25 MB), where
its communication overlaps the backward pass.

    python benchmarks/bench_step.py --json benchmarks/results/step.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.compress.lowrank import effective_rank, matrix_shape, should_compress
from gcomp.examples.charlm import Batches, CharLM, CharLMConfig, language_model_loss, load_corpus
from gcomp.observe import progress_counter


def torch_powersgd_bytes(model: torch.nn.Module, rank: int) -> int:
    """Bytes PyTorch's hook hands to its three allreduces per step (dense, P, Q; fp32)."""
    total = 0
    for param in model.parameters():
        if should_compress(tuple(param.shape), rank, 2.0):
            n, m = matrix_shape(tuple(param.shape))
            total += (n + m) * effective_rank(n, m, rank)
        else:
            total += param.numel()
    return 4 * total


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    config = CharLMConfig.preset(args.model)
    corpus = load_corpus(args.data, 2_000_000)
    start_iter = 2

    def build(method: str, bucket_cap_mb: float):
        torch.manual_seed(0)
        model = CharLM(config)
        ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
        state = None
        if method == "torch-powersgd":
            ddp.register_comm_hook(
                powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank, start_powerSGD_iter=start_iter),
                powerSGD_hook.powerSGD_hook,
            )
        elif method.startswith("gcomp-"):
            name = method.split("-")[1]
            options = {"rank": args.rank, "warmup_steps": start_iter} if name == "powersgd" else {}
            state = gcomp.register(ddp, name, **options)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        batches = Batches(corpus, config.context, args.batch_size, seed=0, rank=rank)
        return {"ddp": ddp, "state": state, "optimizer": optimizer, "batches": batches, "times": []}

    methods = {
        "no hook": ("none", args.one_bucket_mb),
        "torch powerSGD_hook": ("torch-powersgd", args.one_bucket_mb),
        "gcomp powersgd": ("gcomp-powersgd", args.one_bucket_mb),
        "gcomp powersgd (25 MB buckets)": ("gcomp-powersgd", 25.0),
        "gcomp bf16": ("gcomp-bf16", args.one_bucket_mb),
        "gcomp allreduce": ("gcomp-allreduce", args.one_bucket_mb),
    }
    runs = {label: build(*spec) for label, spec in methods.items()}

    def one_step(run) -> float:
        x, y = run["batches"].next()
        dist.barrier()
        began = time.perf_counter()
        run["optimizer"].zero_grad()
        language_model_loss(run["ddp"], x, y).backward()
        run["optimizer"].step()
        return time.perf_counter() - began

    for run in runs.values():  # warm-up: bucket rebuild, PowerSGD start, allocator
        for _ in range(start_iter + 2):
            one_step(run)
        run["bytes_before"] = run["state"].stats()["bytes_sent"] if run["state"] is not None else 0
    bar = progress_counter(total=args.rounds * len(runs) * args.steps_per_round, desc="timed steps",
                           enabled=rank == 0 and not args.no_progress, unit="step")
    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps_per_round):
                run["times"].append(one_step(run))
                bar.update()
    bar.close()

    results = {}
    for label, run in runs.items():
        model = run["ddp"].module
        numel = sum(p.numel() for p in model.parameters())
        state = run["state"]
        if state is not None:  # measured: what the timed steps handed to collectives
            bytes_per_step = (state.stats()["bytes_sent"] - run["bytes_before"]) / len(run["times"])
            state.close()
        elif methods[label][0] == "torch-powersgd":
            bytes_per_step = torch_powersgd_bytes(model, args.rank)
        else:
            bytes_per_step = 4 * numel
        results[label] = {
            "median_step_s": statistics.median(run["times"]),
            "mean_step_s": statistics.fmean(run["times"]),
            "bytes_per_step": bytes_per_step,
            "uncompressed_bytes_per_step": 4 * numel,
            "steps_timed": len(run["times"]),
        }
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump({"parameters": numel, "results": results}, handle)
    del runs
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="CharLM preset (small: 3.3 M parameters)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--one-bucket-mb", type=float, default=100.0)
    parser.add_argument("--data", default=None, help="text corpus (default: Python's stdlib sources)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway when stderr is not a terminal)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        out_path = os.path.join(directory, "out.json")
        mp.spawn(_worker, args=(2, os.path.join(directory, "store"), args, out_path), nprocs=2)
        with open(out_path, encoding="utf-8") as handle:
            data = json.load(handle)
    results = data["results"]
    reference = results["torch powerSGD_hook"]["median_step_s"]
    baseline = results["no hook"]["median_step_s"]
    print(f"model: CharLM {args.model}, {data['parameters'] / 1e6:.2f} M parameters, 2 ranks, gloo, rank {args.rank}")
    print("| method | median step (s) | vs no hook | vs torch powerSGD_hook | bytes/step (MB) | fewer bytes |")
    print("|---|---|---|---|---|---|")
    for label, row in results.items():
        print(
            f"| {label} | {row['median_step_s']:.3f} | {row['median_step_s'] / baseline:.2f} | "
            f"{row['median_step_s'] / reference:.2f} | {row['bytes_per_step'] / 1e6:.3f} | "
            f"{row['uncompressed_bytes_per_step'] / row['bytes_per_step']:.1f}x |"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), **data}, handle, indent=2)


if __name__ == "__main__":
    main()
