"""Train the main job's model with several methods, one after another in one run, and tabulate
final training/validation loss, time and bytes (2 workers via torchrun, gloo, CPU).

    python benchmarks/bench_training.py --steps 300 --methods none torch-powersgd powersgd \
        --json benchmarks/results/training.json

Every method sees the same data order and initial weights (same seed). Extra arguments after
``--`` go to launch/train.py for every run (e.g. ``-- --data ../shared/data/tinyshakespeare.txt``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from gcomp.observe import progress, progress_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def method_arguments(label: str) -> list[str]:
    """launch/train.py arguments for a run label: a train.py method (``powersgd``, ``none``,
    ``torch-powersgd``, ...), ``topk-<feedback>`` (``topk-ef21``, ``topk-econtrol``),
    ``quantize-<bits>`` (``quantize-4``, ``quantize-8``; the feedback rule from ``--feedback`` or the
    method's default), and a ``-adaptive`` suffix for the L-GreCo controller (``powersgd-adaptive``,
    ``topk-ef21-adaptive``, ``quantize-4-adaptive``)."""
    adaptive = label.endswith("-adaptive")
    base = label[: -len("-adaptive")] if adaptive else label
    if base.startswith("topk-"):
        arguments = ["--method", "topk", "--feedback", base.split("-", 1)[1]]
    elif base.startswith("quantize-"):
        arguments = ["--method", "quantize", "--bits", base.split("-", 1)[1]]
    else:
        arguments = ["--method", base]
    return arguments + (["--adaptive"] if adaptive else [])


def run_method(method: str, steps: int, extra: list[str], nproc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "log.jsonl")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            os.path.join(ROOT, "launch", "train.py"), *method_arguments(method), "--steps", str(steps), "--json", log,
            *extra,
        ]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
        with open(log, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["none", "torch-powersgd", "powersgd"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway when stderr is not a terminal)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for launch/train.py, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    results = {}
    bar = progress(args.methods, total=len(args.methods), desc="methods", enabled=not args.no_progress, unit="run")
    for method in bar:
        progress_write(bar, f"running {method} ...")
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(method)
        results[method] = run_method(method, args.steps, extra, args.nproc)
    print(f"\n{args.steps} steps, {args.nproc} workers, launch/train.py {' '.join(extra)}")
    print("| method | final train loss (mean of last 5 logs) | final validation loss | s/step | MB sent per compressed step | fewer bytes than DDP | MB sent in total |")
    print("|---|---|---|---|---|---|---|")
    for method, records in results.items():
        last = records[-1]
        tail = [r["loss"] for r in records[-5:]]
        sent = last.get("bytes_sent")
        per_step = ratio = "-"
        if sent and len(records) >= 2:  # steady state: the last two log records (past warm-up)
            before = records[-2]
            step_bytes = (sent - before["bytes_sent"]) / (last["step"] - before["step"])
            dense_bytes = (last["bytes_uncompressed"] - before["bytes_uncompressed"]) / (last["step"] - before["step"])
            per_step, ratio = f"{step_bytes / 1e6:.3f}", f"{dense_bytes / step_bytes:.1f}x"
        total = f"{sent / 1e6:.1f}" if sent else "-"
        print(f"| {method} | {sum(tail) / len(tail):.4f} | {last['validation_loss']:.4f} | {last['seconds'] / last['step']:.3f} | {per_step} | {ratio} | {total} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
