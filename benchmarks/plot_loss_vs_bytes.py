"""Validation loss against the bytes each rank has sent so far, from bench_adaptive.py's JSON files.

    python benchmarks/plot_loss_vs_bytes.py benchmarks/results/sign/deep_cosine_seed0.json \
        benchmarks/results/sign/deep_constant_seed0.json --titles "deep, cosine" "deep, constant" \
        --out benchmarks/results/sign/loss_vs_bytes.png

One panel per file (three to a row), one curve per run (seed 0, or the first seed the file holds). A run without
gcomp state (``--method none``, plain DDP) is drawn at the uncompressed byte count that the file's
compressed runs log (``bytes_uncompressed``: what DDP hands to its allreduce per step); runs from
other files can be added to a panel with ``--reference FILE[,FILE...]`` (e.g. uncompressed runs measured apart).
The x axis is logarithmic: a run that sends 30x fewer bytes sits 1.5 decades to the left.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(path: str) -> tuple[dict[str, list[tuple[int, float, Optional[float]]]], Optional[float]]:
    """Per run label: (step, validation loss, bytes sent or None) at every evaluated step, and the
    uncompressed bytes per step if any run logged them."""
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    # Every log record repeats the latest validation loss; the evaluated steps are the multiples of
    # train.py's --eval-every (default 50) and the last step.
    extra = saved["arguments"].get("extra", [])
    every = int(extra[extra.index("--eval-every") + 1]) if "--eval-every" in extra else 50
    out: dict[str, list[tuple[int, float, Optional[float]]]] = {}
    per_step: Optional[float] = None
    for label, seeds in saved["results"].items():
        records = seeds[sorted(seeds, key=int)[0]]["records"]
        last = records[-1]["step"]
        out[label] = [(r["step"], r["validation_loss"], r.get("bytes_sent")) for r in records
                      if r.get("validation_loss") is not None and (r["step"] % every == 0 or r["step"] == last)]
        for record in records:
            if record.get("bytes_uncompressed"):
                per_step = record["bytes_uncompressed"] / record["step"]
    return out, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--titles", nargs="+", default=None)
    parser.add_argument("--reference", nargs="*", default=[], help="per panel, files (comma-separated) whose runs are added to it ('' for none)")
    parser.add_argument("--max-loss", type=float, default=None, help="clip every panel's y axis here (diverged runs leave the frame)")
    parser.add_argument("--only", nargs="*", default=None, help="draw only runs with these labels")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    titles = args.titles or args.files
    columns = min(3, len(args.files))
    rows = -(-len(args.files) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for unused in range(len(args.files), rows * columns):
        axes[unused // columns][unused % columns].axis("off")
    for index, (path, title) in enumerate(zip(args.files, titles)):
        runs, per_step = curves(path)
        for extra_path in (args.reference[index].split(",") if index < len(args.reference) and args.reference[index] else []):
            extra, extra_per_step = curves(extra_path)
            runs = {**extra, **runs}
            per_step = per_step or extra_per_step
        if args.only:
            runs = {label: points for label, points in runs.items() if label in args.only}
        axis = axes[index // columns][index % columns]
        for label, points in runs.items():
            xs = [sent if sent is not None else (per_step or 0) * step for step, _, sent in points]
            axis.plot([x / 1e6 for x in xs], [loss for _, loss, _ in points], marker="o", markersize=3, label=label)
        axis.set_xscale("log")
        if args.max_loss is not None:
            lowest = min(loss for points in runs.values() for _, loss, _ in points)
            axis.set_ylim(lowest - 0.05, min(axis.get_ylim()[1], args.max_loss))
        axis.set_xlabel("MB sent per rank so far (log)")
        axis.set_ylabel("validation loss")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
