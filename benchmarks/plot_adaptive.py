"""Plot the adaptive controller's decisions from its JSON-lines log (``--adapt-log`` of
launch/train.py, or ``AdaptiveConfig(log_path=...)``).

    python benchmarks/plot_adaptive.py runs/adaptive.jsonl --out benchmarks/results/adaptive

writes ``<out>_<method>_choices.png`` (each layer's rank / density at every decision, as a heat
map) and ``<out>_<method>_bytes.png`` (bytes per step: uniform, predicted by the DP, and measured
between decisions).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(path: str) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                by_method[record["method"]].append(record)
    return by_method


def plot_choices(records: list[dict], title: str, path: str) -> None:
    layers = sorted({name for record in records for name in record["choices"]})
    grid = np.array([[record["choices"].get(name, np.nan) for record in records] for name in layers], dtype=float)
    figure, axis = plt.subplots(figsize=(2 + 0.6 * len(records), 1 + 0.22 * len(layers)))
    image = axis.imshow(grid, aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(layers)), [name.replace("blocks.layers.", "L") for name in layers], fontsize=7)
    axis.set_xticks(range(len(records)), [str(record["step"]) for record in records], fontsize=7)
    axis.set_xlabel("decision at sync step")
    figure.colorbar(image, ax=axis, label=records[0]["setting"])
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_bytes(records: list[dict], title: str, path: str) -> None:
    steps = [record["step"] for record in records]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, [r["uniform_bytes"] / 1e3 for r in records], "o-", label="uniform setting (compressed layers)")
    axis.plot(steps, [r["predicted_bytes"] / 1e3 for r in records], "s-", label="adaptive choice (predicted)")
    measured = [(r["step"], r["measured_bytes_per_step_since_last"]) for r in records if r.get("measured_bytes_per_step_since_last")]
    if measured:
        axis.plot([s for s, _ in measured], [b / 1e3 for _, b in measured], "^--", label="measured per step before this decision (all layers)")
    axis.set_xlabel("sync step")
    axis.set_ylabel("kB per step (log scale)")
    axis.set_yscale("log")  # the first measured point includes the dense warm-up steps
    axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--out", default="adaptive", help="path prefix of the PNG files")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for method, records in load(args.log).items():
        plot_choices(records, f"{method}: per-layer {records[0]['setting']} chosen by the controller", f"{args.out}_{method}_choices.png")
        plot_bytes(records, f"{method}: bytes per step", f"{args.out}_{method}_bytes.png")
        print(f"{method}: {len(records)} decisions -> {args.out}_{method}_choices.png, {args.out}_{method}_bytes.png")


if __name__ == "__main__":
    main()
