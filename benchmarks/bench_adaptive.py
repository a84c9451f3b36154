"""Adaptive (L-GreCo) against uniform settings: validation loss and bytes, over several seeds
(2 workers via torchrun, or `--workers N`; gloo, CPU; one run after another).

    python benchmarks/bench_adaptive.py --model deep --steps 300 --seeds 0 1 2 \
        --run uniform "--method powersgd" \
        --run adaptive "--method powersgd --adaptive --adapt-every 25 --adapt-error-measure relative" \
        --json benchmarks/results/adaptive_v2/powersgd_deep.json -- --data ../shared/data/tinyshakespeare.txt

The first ``--run`` is the reference of the ratios. "Compressed phase" is everything after the
dense warm-up (``--warmup-steps``, train.py's default 20; it must be a multiple of ``--log-every``,
default 10, so the log holds the bytes at its end, else the compressed phase is reported as unknown);
"whole run" includes the warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(arguments: list[str], steps: int, workers: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "log.jsonl")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
            os.path.join(ROOT, "launch", "train.py"), *arguments, "--steps", str(steps), "--json", log, "--no-progress",
        ]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        with open(log, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]


def summarise(records: list[dict], warmup_steps: int) -> dict:
    last = records[-1]
    if "bytes_sent" not in last:  # plain DDP (no gcomp state): its bytes are the uncompressed ones of the other runs
        return {"validation_loss": last["validation_loss"], "bytes_whole_run": None, "bytes_compressed_phase": None,
                "bytes_uncompressed": None, "seconds_per_step": last["seconds"] / last["step"]}
    # The bytes at the warm-up's end; unknown (None, shown as "-") when that step was not logged,
    # rather than the whole run's bytes under the compressed phase's name.
    at_warmup = next((r for r in records if r["step"] == warmup_steps), None) if warmup_steps else {"bytes_sent": 0}
    return {
        "validation_loss": last["validation_loss"],
        "bytes_whole_run": last["bytes_sent"],
        "bytes_compressed_phase": None if at_warmup is None else last["bytes_sent"] - at_warmup["bytes_sent"],
        "bytes_uncompressed": last["bytes_uncompressed"],
        "seconds_per_step": last["seconds"] / last["step"],
    }


def _value(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=2, action="append", metavar=("LABEL", "ARGUMENTS"), required=True,
                        help="a label and launch/train.py arguments (quoted); repeat for each configuration")
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="processes (ranks), one machine")
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for every launch/train.py run, after --")
    args = parser.parse_args()
    common = [a for a in args.extra if a != "--"] + ["--model", args.model, "--warmup-steps", str(args.warmup_steps)]
    results: dict[str, dict[int, dict]] = {}
    for label, arguments in args.run:
        results[label] = {}
        for seed in args.seeds:
            records = train(shlex.split(arguments) + common + ["--seed", str(seed)], args.steps, args.workers)
            results[label][seed] = {"summary": summarise(records, args.warmup_steps), "records": records}
            print(f"{label} seed {seed}: {results[label][seed]['summary']}", file=sys.stderr, flush=True)
    reference = args.run[0][0]

    def mean_of(label: str, key: str) -> float | None:
        values = [run["summary"][key] for run in results[label].values()]
        return None if None in values else statistics.mean(values)

    def ratio(numerator: float | None, denominator: float | None) -> str:
        return "-" if numerator is None or not denominator else f"{numerator / denominator:.2f}x"

    def megabytes(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.1f}"

    print(f"\nmodel {args.model}, {args.steps} steps, {args.warmup_steps} dense warm-up steps, seeds {args.seeds}; launch/train.py {' '.join(common)}")
    print("| run | final validation loss | vs first row | MB whole run | MB compressed phase | fewer bytes than first row (compressed phase) | fewer bytes than DDP (whole run) |")
    print("|---|---|---|---|---|---|---|")
    for label, _ in args.run:
        losses = [run["summary"]["validation_loss"] for run in results[label].values()]
        loss_change = 100 * (statistics.mean(losses) / mean_of(reference, "validation_loss") - 1)
        compressed = mean_of(label, "bytes_compressed_phase")
        print(f"| {label} | {_value(losses)} | {loss_change:+.2f} % | {megabytes(mean_of(label, 'bytes_whole_run'))} | {megabytes(compressed)} | "
              f"{ratio(mean_of(reference, 'bytes_compressed_phase'), compressed)} | {ratio(mean_of(label, 'bytes_uncompressed'), mean_of(label, 'bytes_whole_run'))} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), "results": results}, handle)


if __name__ == "__main__":
    main()
