"""Plot the TensorBoard scalars of a ``launch/train.py --tensorboard DIR`` run into one PNG.

    python benchmarks/plot_tensorboard.py runs/powersgd-adaptive --out docs/tensorboard_scalars.png

Reads the event file(s) in DIR with TensorBoard's ``EventAccumulator`` (no TensorBoard server
needed) and draws four panels: training loss, bytes sent per step against the uncompressed
count, the compression ratio, and every layer's PowerSGD rank (or top-k density) over the run,
with the adaptive (L-GreCo) decisions marked. The solver's predicted bytes cover the compressed
layers' factors only, so they sit below the measured bytes, which include the dense leftovers. It shows in a document what the TensorBoard UI shows.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def series(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag; empty lists when the run did not write it."""
    if tag not in events.Tags().get("scalars", []):
        return [], []
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def plot(log_dir: str, out: str, title: Optional[str] = None) -> str:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    tags = events.Tags().get("scalars", [])
    if not tags:
        raise SystemExit(f"no scalars in {log_dir} (expected the output of launch/train.py --tensorboard)")
    figure, axes = plt.subplots(2, 2, figsize=(12, 7.5))

    ax = axes[0][0]
    ax.plot(*series(events, "train/loss"), label="training loss")
    steps, values = series(events, "train/validation_loss")
    if steps:
        ax.plot(steps, values, "o-", label="validation loss")
    ax.set(title="train/loss", xlabel="step", ylabel="loss")
    ax.legend()

    ax = axes[0][1]
    steps, sent = series(events, "gcomp/bytes_sent")
    _, dense = series(events, "gcomp/bytes_uncompressed")
    per_step = [(steps[i], (sent[i] - sent[i - 1]) / (steps[i] - steps[i - 1]), (dense[i] - dense[i - 1]) / (steps[i] - steps[i - 1]))
                for i in range(1, min(len(steps), len(dense)))]
    if per_step:
        ax.plot([p[0] for p in per_step], [p[1] / 1e6 for p in per_step], label="gcomp bytes_sent per step")
        ax.plot([p[0] for p in per_step], [p[2] / 1e6 for p in per_step], "--", label="uncompressed DDP")
    decision_steps, predicted = series(events, "gcomp_adaptive/predicted_bytes")
    if decision_steps:
        ax.plot(decision_steps, [v / 1e6 for v in predicted], "x", markersize=9, label="L-GreCo predicted (compressed layers only)")
    ax.set(title="gcomp/bytes_sent (per step)", xlabel="step", ylabel="MB per step", yscale="log")
    ax.legend()

    ax = axes[1][0]
    ax.plot(*series(events, "gcomp/compression_ratio"))
    ax.set(title="gcomp/compression_ratio (cumulative, warm-up included)", xlabel="step", ylabel="uncompressed / sent")

    ax = axes[1][1]
    layer_tags = sorted(tag for tag in tags if tag.startswith("gcomp_layers/"))
    for index, tag in enumerate(layer_tags):  # one thin line per layer; a legend of them all would hide the plot
        steps, values = series(events, tag)
        jitter = 0.06 * (index / max(1, len(layer_tags) - 1) - 0.5)  # keeps overlapping layers visible
        ax.step(steps, [v + jitter for v in values], where="post", linewidth=1.0, alpha=0.7)
    for step in decision_steps:
        ax.axvline(step, color="grey", linewidth=0.6, linestyle=":")
    kind = layer_tags[0].split("/")[1] if layer_tags else "setting"
    ax.set(title=f"gcomp_layers/{kind}: {len(layer_tags)} layers (dotted: adaptive decisions)", xlabel="step", ylabel=kind)

    figure.suptitle(title or f"TensorBoard scalars of {os.path.basename(os.path.normpath(log_dir))}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="the directory given to launch/train.py --tensorboard")
    parser.add_argument("--out", default="docs/tensorboard_scalars.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(plot(args.log_dir, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
