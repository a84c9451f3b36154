"""Training over a lossy link: the same run on two emulated nodes with and without random packet
loss (iptables ``statistic`` match on every node's input; this kernel has no netem). TCP
retransmits what is dropped, so the result must be identical and only the time may grow.

    sudo .venv/bin/python benchmarks/bench_lossy.py --loss 0.01 --json benchmarks/results/lossy.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

from cluster import run_training  # noqa: E402
from netns import EmulatedCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--json", default=None)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="launch/train.py arguments after --")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"] or [
        "--model", "tiny", "--steps", "60", "--method", "powersgd", "--rank", "4", "--warmup-steps", "5",
        "--batch-size", "8", "--eval-every", "0", "--log-every", "5",
    ]
    results = {}
    for loss in (0.0, args.loss):
        with tempfile.TemporaryDirectory() as directory, EmulatedCluster(nodes=2, rate=args.rate, loss=loss) as cluster:
            run = run_training(cluster, train_args, log_dir=directory, quiet=True, timeout=600)
            records = run.train_records()
            results[loss] = {
                "succeeded": run.succeeded,
                "wall_seconds": run.wall_seconds,
                "train_seconds": records[-1]["seconds"] if records else None,
                "final_loss": records[-1]["loss"] if records else None,
                "node0_tx_bytes": run.nic[0].tx_bytes,
                "bytes_sent": run.gcomp_stats().get("bytes_sent"),
            }
    clean, lossy = results[0.0], results[args.loss]
    print(f"link {args.rate}, train.py {' '.join(train_args)}")
    print("| packet loss | completed | training s | final loss | node 0 tx MB | gcomp bytes_sent MB |")
    print("|---|---|---|---|---|---|")
    for loss, row in results.items():
        print(f"| {loss:.0%} | {row['succeeded']} | {row['train_seconds']:.1f} | {row['final_loss']:.6f} | "
              f"{row['node0_tx_bytes'] / 1e6:.2f} | {row['bytes_sent'] / 1e6:.2f} |")
    same = clean["final_loss"] == lossy["final_loss"]
    print(f"same final loss: {same}; slowdown from {args.loss:.0%} loss: {lossy['train_seconds'] / clean['train_seconds']:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"train_args": train_args, "rate": args.rate, "results": {str(k): v for k, v in results.items()}, "same_final_loss": same}, handle, indent=2)
    sys.exit(0 if same and clean["succeeded"] and lossy["succeeded"] else 1)


if __name__ == "__main__":
    main()
