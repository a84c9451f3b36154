"""A torch.profiler trace of gcomp's reductions, as Chrome JSON (open it in chrome://tracing or
Perfetto), with the ranges gcomp marks: ``gcomp.compress``, ``gcomp.collective``,
``gcomp.decompress`` and ``gcomp.decide``.

    python benchmarks/profile_trace.py --method powersgd --trace trace.json

One gloo rank on the CPU, the tiny CharLM, a few steps with the adaptive controller on (so a
decision falls inside the trace). Prints how many of each range the trace holds.

gcomp reduces buckets on a communication thread of its own: the profiler records that thread's
ranges only with ``profile_all_threads=True`` (Kineto's experimental config), as below.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.examples.charlm import CharLM, CharLMConfig

RANGES = ("gcomp.compress", "gcomp.collective", "gcomp.decompress", "gcomp.profile", "gcomp.decide")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="powersgd", choices=["powersgd", "topk"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--trace", default="gcomp_trace.json", help="where the Chrome JSON trace goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'store')}", rank=0, world_size=1)
        torch.manual_seed(0)
        ddp = DistributedDataParallel(CharLM(CharLMConfig.preset("tiny")))
        state = gcomp.register(ddp, args.method, warmup_steps=1, adaptive=gcomp.AdaptiveConfig(every_steps=3, accumulate_steps=1))
        tokens = torch.randint(0, 256, (4, 65), device="cpu")
        all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=all_threads) as profiler:
            for _ in range(args.steps):
                ddp.zero_grad()
                logits = ddp(tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            state.synchronize()  # a decision after the last step runs behind it, off the training thread
        state.close()
        dist.destroy_process_group()
    profiler.export_chrome_trace(args.trace)
    with open(args.trace, encoding="utf-8") as handle:
        events = json.load(handle)["traceEvents"]
    counts = collections.Counter(event.get("name") for event in events if str(event.get("name", "")).startswith("gcomp."))
    for name in RANGES:
        print(f"{name:18s} {counts.get(name, 0):5d}")
    missing = [name for name in RANGES if not counts.get(name)]
    if missing:
        raise SystemExit(f"ranges missing from the trace: {missing}")
    print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
