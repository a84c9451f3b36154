"""What the L-GreCo controller costs: decision time, per-layer error time, profiling time, and the
step time of an adaptive run next to a uniform one (2 workers via torchrun, gloo, CPU).

    python benchmarks/bench_adaptive_cost.py --model deep --steps 320 --method powersgd \
        --json benchmarks/results/adaptive_cost_deep.json -- --data ../shared/data/tinyshakespeare.txt

With ``--warmup-steps 20`` (train.py's default) and a decision every 100 compressed steps, a 320-step
run makes three decisions. The controller's work runs on the communication thread behind a step's
last bucket (``profile`` sums the profiled tensors, ``decide`` measures the errors, averages the
table and solves), so its host seconds bound what it can add to training time; the step-time
ratio of the two runs is what it did add (noisy on a shared host).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_training import run_method  # noqa: E402


def _summary(label: str, records: list[dict], decisions: list[dict]) -> dict:
    last = records[-1]
    seconds = last.get("gcomp_seconds", {})
    out = {
        "run": label,
        "steps": last["step"],
        "wall_seconds": last["seconds"],
        "seconds_per_step": last["seconds"] / last["step"],
        "profile_seconds": seconds.get("profile", 0.0),
        "decide_seconds": seconds.get("decide", 0.0),
        "decisions": len(decisions),
        "validation_loss": last["validation_loss"],
        "bytes_sent": last.get("bytes_sent"),
    }
    if decisions:
        per_layer = [value for record in decisions for value in record["error_seconds"].values()]
        out.update({
            "decision_ms_mean": 1e3 * statistics.mean(record["seconds"] for record in decisions),
            "decision_ms_max": 1e3 * max(record["seconds"] for record in decisions),
            "layers_profiled": len(decisions[0]["error_seconds"]),
            "layer_error_ms_mean": 1e3 * statistics.mean(per_layer),
            "layer_error_ms_max": 1e3 * max(per_layer),
        })
    out["controller_share"] = (out["profile_seconds"] + out["decide_seconds"]) / out["wall_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deep")
    parser.add_argument("--method", default="powersgd", help="powersgd or topk-<feedback>")
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--every", type=int, default=100, help="compressed steps between decisions")
    parser.add_argument("--skip-uniform", action="store_true", help="only the adaptive run (its own host seconds)")
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for launch/train.py, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"] + ["--model", args.model, "--eval-every", "0"]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        log = os.path.join(directory, "decisions.jsonl")
        adaptive = run_method(f"{args.method}-adaptive", args.steps, extra + ["--adapt-every", str(args.every), "--adapt-log", log], 2)
        with open(log, encoding="utf-8") as handle:
            decisions = [json.loads(line) for line in handle]
        rows.append(_summary("adaptive", adaptive, decisions))
    if not args.skip_uniform:
        rows.insert(0, _summary("uniform", run_method(args.method, args.steps, extra, 2), []))
    print(f"\n{args.method}, model {args.model}, {args.steps} steps, a decision every {args.every} compressed steps")
    print("| run | s/step | decisions | ms per decision (mean / max) | layers | ms per layer's errors (mean / max) | profile s | decide s | controller s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        decision = f"{row['decision_ms_mean']:.0f} / {row['decision_ms_max']:.0f}" if row["decisions"] else "-"
        layer = f"{row['layer_error_ms_mean']:.1f} / {row['layer_error_ms_max']:.1f}" if row["decisions"] else "-"
        print(f"| {row['run']} | {row['seconds_per_step']:.3f} | {row['decisions']} | {decision} | {row.get('layers_profiled', '-')} | {layer} | "
              f"{row['profile_seconds']:.2f} | {row['decide_seconds']:.2f} | {100 * row['controller_share']:.2f} % |")
    if len(rows) == 2:
        print(f"\nadaptive / uniform step time: {rows[1]['seconds_per_step'] / rows[0]['seconds_per_step']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
