"""Methods x link rates on the emulated 2-node cluster: bytes on the wire, step time, time to loss.

    python benchmarks/bench_cluster.py --quick                          # CI: tiny model, one rate, a few minutes
    python benchmarks/bench_cluster.py --json benchmarks/results/cluster.json --plots benchmarks/results/cluster
    python benchmarks/bench_cluster.py --rates 50mbit 1gbit none --methods none powersgd -- --data ../shared/data/tinyshakespeare.txt
    python benchmarks/bench_cluster.py --nproc-per-node 2 --hierarchical off on --methods powersgd topk   # 2 nodes x 2 processes

Each (method, rate) pair is one launch/train.py run on two network namespaces joined by a veth pair
shaped to the rate (launch/netns.py), one torchrun per namespace, exactly as on two machines. Per
pair it reports:

- NIC bytes per step: what node 0's interface transmitted during the run / steps. Everything is in
  it: warm-up steps, DDP's parameter broadcast at start and its per-step buffer broadcast, TCP/IP
  headers and ACKs, torchrun's rendezvous. Rank 0 lives on node 0.
- payload bytes per step: gcomp's own count (``stats()["bytes_sent"]`` of rank 0 / steps; gcomp
  methods only), and the steady-state wire bytes per step after warm-up (from NIC samples taken
  while the training log grows).
- step time: mean seconds per step after warm-up over logged intervals that contain no evaluation
  (for ``auto`` and ``--time-aware`` runs: after the time-aware decision, whose step and choice
  are reported too).
- link bound: steady wire bytes per step x 8 / rate, the time the link alone needs per step; the
  ratio bound / step time says how much of a step the link is busy (near 1: communication-bound).
  With ``none`` among the rates (an unshaped link), comm time = step time - unshaped step time.
- time to the target validation loss (``--target-loss``; default: the worst final validation loss
  at that rate, so every method reaches it), final training and validation loss.

With ``--nproc-per-node 2`` each node runs two workers (they talk over the namespace's loopback,
unshaped, as GPUs of one machine over NVLink; only traffic between nodes crosses the shaped link),
and ``--hierarchical off on`` runs every gcomp method both flat and hierarchically (dense inside a
node, compressed among node leaders): node 0's NIC counters then say what each path sends between
nodes. Rows are labelled ``method/flat`` and ``method/hier``.

Runs go one after another (2 cores here: concurrent runs would measure each other). Timings are
compared as ratios within one run of this script, never asserted. Extra arguments after ``--`` go
to launch/train.py for every run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

from cluster import ClusterRun, run_training, split_passthrough  # noqa: E402
from netns import ClusterError, EmulatedCluster  # noqa: E402

from gcomp.observe import progress_counter, progress_write  # noqa: E402

BASELINE_METHODS = ["none", "torch-fp16", "torch-powersgd", "powersgd", "allreduce", "bf16"]


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration: the training run every (method, rate) pair repeats."""

    model: str
    steps: int
    warmup_steps: int
    eval_every: int
    log_every: int
    batch_size: int
    rank: int
    rates: tuple[str, ...]
    nproc_per_node: int = 1
    hierarchical: tuple[str, ...] = ("auto",)


QUICK = Settings(model="tiny", steps=40, warmup_steps=10, eval_every=10, log_every=5, batch_size=8, rank=4, rates=("100mbit",))
FULL = Settings(model="small", steps=200, warmup_steps=20, eval_every=20, log_every=10, batch_size=16, rank=4,
                rates=("100mbit", "1gbit"))


def default_methods() -> list[str]:
    """PyTorch's baselines and every gcomp method this checkout has (new ones join automatically)."""
    import gcomp

    return BASELINE_METHODS + sorted(m for m in gcomp.METHODS if m not in BASELINE_METHODS)


@dataclass
class LogFollower:
    """Reads train.py's JSON log while it grows and reads node 0's NIC counter whenever new records
    appear, giving (step, transmitted bytes) anchors for the newest record of each read.

    The counter is read up to ~0.05 s after the record was written, so an anchor may include a few
    more steps of traffic than its step says. That lag does not depend on the step, so slopes fitted
    through the anchors (bytes per step) are unbiased; only the curve is shifted slightly.
    """

    cluster: EmulatedCluster
    path: str
    baseline_tx: int = 0
    offset: int = 0
    anchors: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.baseline_tx = self.cluster.nic_bytes()[0]["tx_bytes"]

    def __call__(self, seconds: float) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        if not complete:
            return
        self.offset += len(complete.encode("utf-8"))
        tx = self.cluster.nic_bytes()[0]["tx_bytes"] - self.baseline_tx
        newest = json.loads(complete.strip().splitlines()[-1])
        self.anchors.append((int(newest["step"]), tx))


def slope(points: Sequence[tuple[int, int]]) -> Optional[float]:
    """Least-squares bytes per step through (step, bytes) points."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def interpolate(step: int, points: Sequence[tuple[int, int]]) -> Optional[float]:
    """Bytes at ``step``, linearly between the anchors (clamped at the ends)."""
    if not points:
        return None
    if step <= points[0][0]:
        return float(points[0][1])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= step <= x1:
            return y0 + (y1 - y0) * (step - x0) / (x1 - x0) if x1 > x0 else float(y1)
    return float(points[-1][1])


def log_interval(eval_every: int, wanted: int) -> int:
    """A log interval that divides ``eval_every`` (so every evaluation is logged) and is shorter than
    it (so some logged intervals hold no evaluation and can time pure training steps)."""
    if eval_every <= 1:
        return max(1, wanted)
    interval = math.gcd(eval_every, wanted)
    if interval == eval_every:
        interval = max(d for d in range(1, eval_every) if eval_every % d == 0)
    return interval


def has_evaluation(step: int, settings: Settings) -> bool:
    return step == settings.steps or (settings.eval_every > 0 and step % settings.eval_every == 0)


def time_aware_decision(records: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The time-aware decision train.py logged (``auto`` / ``--time-aware`` runs), if any."""
    return next((record["time_aware"] for record in records if record.get("time_aware")), None)


def steady_step_time(records: list[dict[str, Any]], settings: Settings) -> Optional[float]:
    """Seconds per step after warm-up (and after the time-aware decision, if one was made), over
    logged intervals without an evaluation in them (over all such intervals if every one holds an
    evaluation)."""
    decision = time_aware_decision(records)
    start = max(settings.warmup_steps, decision["step"] + 1 if decision else 0)
    intervals = [(before, after) for before, after in zip(records, records[1:]) if before["step"] >= start]
    clean = [(before, after) for before, after in intervals
             if not any(has_evaluation(s, settings) for s in range(before["step"] + 1, after["step"] + 1))]
    chosen = clean or intervals
    steps = sum(after["step"] - before["step"] for before, after in chosen)
    seconds = sum(after["seconds"] - before["seconds"] for before, after in chosen)
    return seconds / steps if steps else None


def summarise(method: str, rate: Optional[str], run: ClusterRun, anchors: list[tuple[int, int]], settings: Settings) -> dict[str, Any]:
    """Reduce one run to the numbers of the table (plus its curve, for the plots)."""
    records = run.train_records()
    steps = records[-1]["step"] if records else 0
    node0_tx = run.nic[0].tx_bytes
    result: dict[str, Any] = {
        "method": method, "rate": rate or "unshaped", "rate_bits_per_second": run.rate_bits_per_second,
        "exit_codes": run.exit_codes, "succeeded": run.succeeded and steps == settings.steps,
        "wall_seconds": run.wall_seconds, "steps": steps,
        "node0_tx_bytes": node0_tx, "node1_tx_bytes": run.nic[1].tx_bytes,
        "nic_bytes_per_step": node0_tx / steps if steps else None,
    }
    stats = run.gcomp_stats()
    result["payload_bytes_per_step"] = stats["bytes_sent"] / steps if stats and steps else None
    result["uncompressed_bytes_per_step"] = stats["bytes_uncompressed"] / steps if stats and steps else None
    result["nic_per_payload"] = node0_tx / stats["bytes_sent"] if stats and stats.get("bytes_sent") else None

    # Steady state: the slope of node 0's bytes over the steps after warm-up (the end counter is exact).
    points = sorted({*anchors, (steps, node0_tx)}) if steps else []
    steady_wire = slope([(x, y) for x, y in points if x >= settings.warmup_steps])
    result["steady_nic_bytes_per_step"] = steady_wire
    step_time = steady_step_time(records, settings)
    result["step_time_s"] = step_time
    result["mean_step_time_s"] = records[-1]["seconds"] / steps if steps else None
    bound = steady_wire * 8 / run.rate_bits_per_second if steady_wire is not None and run.rate_bits_per_second else None
    result["link_bound_s"] = bound
    result["link_busy_fraction"] = bound / step_time if bound is not None and step_time else None
    decision = time_aware_decision(records)
    result["time_aware_choice"] = decision["choice"] if decision else None
    result["time_aware_step"] = decision["step"] if decision else None
    result["time_aware_compressed_layers"] = len(decision["compressed_layers"]) if decision else None
    result["time_aware_predicted_step_s"] = decision["predicted_step_s"] if decision else None
    result["final_loss"] = records[-1]["loss"] if records else None
    result["final_validation_loss"] = records[-1].get("validation_loss") if records else None
    curve = []
    for record in records:
        curve.append({
            "step": record["step"], "seconds": record["seconds"], "loss": record["loss"],
            "validation_loss": record.get("validation_loss") if has_evaluation(record["step"], settings) else None,
            "node0_tx_bytes": interpolate(record["step"], points),
        })
    result["curve"] = curve
    return result


def fill_targets(results: list[dict[str, Any]], target: Optional[float]) -> dict[str, float]:
    """Time to the target validation loss per run; returns the target used per rate."""
    targets: dict[str, float] = {}
    for rate in dict.fromkeys(r["rate"] for r in results):
        finals = [r["final_validation_loss"] for r in results
                  if r["rate"] == rate and r["succeeded"] and r["final_validation_loss"] is not None]
        if target is not None:
            targets[rate] = target
        elif finals:
            targets[rate] = max(finals)
    for result in results:
        goal = targets.get(result["rate"])
        result["target_loss"] = goal
        result["time_to_target_s"] = None
        if goal is None:
            continue
        for point in result["curve"]:
            if point["validation_loss"] is not None and point["validation_loss"] <= goal:
                result["time_to_target_s"] = point["seconds"]
                break
    return targets


def fill_comm_time(results: list[dict[str, Any]]) -> None:
    """Comm time = step time minus the same method's step time on an unshaped link (if measured)."""
    unshaped = {r["method"]: r["step_time_s"] for r in results if r["rate"] == "unshaped" and r["step_time_s"]}
    for result in results:
        base = unshaped.get(result["method"])
        result["comm_time_s"] = result["step_time_s"] - base if base is not None and result["step_time_s"] is not None else None


def markdown_table(results: list[dict[str, Any]]) -> str:
    def number(value: Optional[float], scale: float = 1.0, digits: int = 3) -> str:
        return "-" if value is None else f"{value / scale:.{digits}f}"

    lines = [
        "| method | rate | NIC kB/step | payload kB/step | steady NIC kB/step | step time s | link bound s | busy "
        "| comm time s | time to target s | final loss | final val |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = "" if r["succeeded"] else f" (FAILED, exit {r['exit_codes']})"
        if r.get("time_aware_choice"):
            status += (f" -> {r['time_aware_choice']}, {r['time_aware_compressed_layers']} layers compressed "
                       f"(predicted {r['time_aware_predicted_step_s']:.3f} s)")
        lines.append(
            f"| {r['method']}{status} | {r['rate']} | {number(r['nic_bytes_per_step'], 1e3, 1)} | "
            f"{number(r['payload_bytes_per_step'], 1e3, 1)} | {number(r['steady_nic_bytes_per_step'], 1e3, 1)} | "
            f"{number(r['step_time_s'])} | {number(r['link_bound_s'])} | {number(r['link_busy_fraction'], 1, 2)} | "
            f"{number(r['comm_time_s'])} | {number(r['time_to_target_s'], 1, 1)} | "
            f"{number(r['final_loss'], 1, 4)} | {number(r['final_validation_loss'], 1, 4)} |"
        )
    return "\n".join(lines)


def link_table(results: list[dict[str, Any]]) -> str:
    """What crossed the link between the nodes: both nodes' NIC tx over the whole run and per
    step after warm-up, and rank 0's own count of its inter-node (or flat) collectives."""
    lines = [
        "| method | rate | path | node 0 tx MB | node 1 tx MB | steady node 0 tx kB/step | rank 0 counted kB/step (link) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        links = r.get("links") or {}
        kind = "inter_node" if "inter_node" in links else ("flat" if "flat" in links else None)
        counted = links[kind]["bytes_sent"] / r["steps"] / 1e3 if kind and r["steps"] else None
        lines.append(
            f"| {r['method']} | {r['rate']} | {r.get('path') or '-'} | {r['node0_tx_bytes'] / 1e6:.2f} | "
            f"{r['node1_tx_bytes'] / 1e6:.2f} | "
            + ("-" if r["steady_nic_bytes_per_step"] is None else f"{r['steady_nic_bytes_per_step'] / 1e3:.1f}")
            + " | " + ("-" if counted is None else f"{counted:.1f} ({kind})") + " |"
        )
    return "\n".join(lines)


def write_plots(results: list[dict[str, Any]], directory: str) -> list[str]:
    """Loss vs training time and vs node 0's NIC bytes (one figure pair per rate), step time vs rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    rates = list(dict.fromkeys(r["rate"] for r in results))
    for rate in rates:
        runs = [r for r in results if r["rate"] == rate and r["curve"]]
        for axis_key, label, file_stem in (("seconds", "training time (s)", "loss_vs_time"),
                                            ("node0_tx_bytes", "node 0 NIC tx (MB)", "loss_vs_nic_bytes")):
            figure, axes = plt.subplots(figsize=(7, 4.5))
            for run in runs:
                points = [p for p in run["curve"] if p[axis_key] is not None]
                scale = 1e6 if axis_key == "node0_tx_bytes" else 1.0
                line, = axes.plot([p[axis_key] / scale for p in points], [p["loss"] for p in points], label=run["method"], alpha=0.6)
                validation = [p for p in points if p["validation_loss"] is not None]
                axes.plot([p[axis_key] / scale for p in validation], [p["validation_loss"] for p in validation], "o",
                          color=line.get_color(), markersize=4)
            if axis_key == "node0_tx_bytes":
                axes.set_xscale("log")
            target = next((r["target_loss"] for r in runs if r.get("target_loss") is not None), None)
            if target is not None:
                axes.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
            axes.set_xlabel(label)
            axes.set_ylabel("loss (line: training, dots: validation)")
            axes.set_title(f"2 emulated nodes, link {rate}")
            axes.legend(fontsize=8)
            figure.tight_layout()
            path = os.path.join(directory, f"{file_stem}_{rate}.png")
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    shaped = [r for r in results if r["rate_bits_per_second"] and r["step_time_s"]]
    if shaped:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in shaped):
            runs = sorted((r for r in shaped if r["method"] == method), key=lambda r: r["rate_bits_per_second"])
            line, = axes.plot([r["rate_bits_per_second"] / 1e6 for r in runs], [r["step_time_s"] for r in runs], "o-", label=method)
            bounds = [r for r in runs if r["link_bound_s"]]
            axes.plot([r["rate_bits_per_second"] / 1e6 for r in bounds], [r["link_bound_s"] for r in bounds], "x:",
                      color=line.get_color(), linewidth=1)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("link rate (Mbit/s)")
        axes.set_ylabel("s per step (o: measured, x: link bound)")
        axes.set_title("step time vs link rate, 2 emulated nodes")
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(directory, "step_time_vs_rate.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def split_method(spec: str) -> tuple[str, list[str]]:
    """``"label=method --option value"`` -> (label, train.py arguments); a bare method is its own
    label. So one invocation can compare variants of a method, e.g.
    ``"powersgd-bf16=powersgd --factor-dtype bfloat16"``."""
    label, _, definition = spec.partition("=")
    if not definition:
        return spec, ["--method", spec]
    method, *options = definition.split()
    return label, ["--method", method, *options]


def run_labels(methods: Sequence[str], settings: Settings) -> list[tuple[str, list[str], Optional[str]]]:
    """(label, train.py method arguments, hierarchical switch) of every run at one rate: gcomp
    methods once per ``settings.hierarchical`` value (labelled ``label/flat``, ``label/hier``,
    ``label/auto`` when there are several), PyTorch's baselines once."""
    import gcomp

    names = {"off": "flat", "on": "hier", "auto": "auto"}
    runs = []
    for spec in methods:
        label, arguments = split_method(spec)
        method = arguments[1]
        if method in gcomp.METHODS and len(settings.hierarchical) > 1:
            runs += [(f"{label}/{names[value]}", arguments, value) for value in settings.hierarchical]
        elif method in gcomp.METHODS:
            runs.append((label, arguments, settings.hierarchical[0]))
        else:
            runs.append((label, arguments, None))
    return runs


def train_arguments(method_arguments: Sequence[str], settings: Settings, log_path: str, extra: Sequence[str],
                    hierarchical: Optional[str] = None) -> list[str]:
    switch = ["--hierarchical", hierarchical] if hierarchical is not None else []
    return [
        *switch, *method_arguments, "--model", settings.model, "--steps", str(settings.steps),
        "--warmup-steps", str(settings.warmup_steps), "--rank", str(settings.rank),
        "--batch-size", str(settings.batch_size), "--eval-every", str(settings.eval_every),
        "--log-every", str(settings.log_every), "--json", log_path, *extra,
    ]


def run_matrix(methods: Sequence[str], settings: Settings, work_dir: str, extra: Sequence[str],
               timeout: float, show_progress: bool = False) -> list[dict[str, Any]]:
    """Every method at every rate, one run at a time, one emulated cluster per rate."""
    results = []
    runs = run_labels(methods, settings)
    bar = progress_counter(total=len(settings.rates) * len(runs), desc="runs", enabled=show_progress, unit="run")
    for rate in settings.rates:
        shaped = None if rate == "none" else rate
        with EmulatedCluster(nodes=2, rate=shaped) as cluster:
            for label, method_arguments, hierarchical in runs:
                run_dir = os.path.join(work_dir, f"{rate}-{label.replace('/', '-')}")
                os.makedirs(run_dir, exist_ok=True)
                log_path = os.path.join(run_dir, "train_log.jsonl")
                if os.path.exists(log_path):
                    os.remove(log_path)
                follower = LogFollower(cluster, log_path)
                bar.set_postfix_str(f"{rate} {label}")
                run = run_training(cluster, train_arguments(method_arguments, settings, log_path, extra, hierarchical),
                                   log_dir=run_dir, nproc_per_node=settings.nproc_per_node, quiet=True, timeout=timeout,
                                   monitor=follower, poll_interval=0.05)
                follower(0.0)
                result = summarise(label, shaped, run, follower.anchors, settings)
                records = run.train_records()
                result["path"] = records[-1].get("path") if records else None
                result["links"] = records[-1].get("links") if records else None
                result["node_logs"] = run.node_logs
                results.append(result)
                status = "ok" if result["succeeded"] else f"FAILED {run.exit_codes}, see {run_dir}"
                progress_write(bar, f"[{rate}] {label} ... {status}, {run.wall_seconds:.1f} s")
                bar.update()
    bar.close()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"CI mode: {QUICK}")
    parser.add_argument("--methods", nargs="+", default=None, help="default: PyTorch baselines + every gcomp method")
    parser.add_argument("--rates", nargs="+", default=None, help="link rates (tc syntax); 'none' = unshaped (gives comm time)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="PowerSGD rank (gcomp and torch)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="workers per emulated node (default 1)")
    parser.add_argument("--hierarchical", nargs="+", default=None, choices=("auto", "on", "off"),
                        help="gcomp methods: run each of these (off: flat, on: dense inside a node and compressed "
                             "between nodes); default auto")
    parser.add_argument("--target-loss", type=float, default=None, help="validation loss to reach (default: worst final one per rate)")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory")
    parser.add_argument("--work-dir", default=None, help="per-run logs (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway when stderr is not a terminal)")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    overrides = {key: value for key, value in {
        "model": args.model, "steps": args.steps, "warmup_steps": args.warmup_steps, "eval_every": args.eval_every,
        "batch_size": args.batch_size, "rank": args.rank, "rates": tuple(args.rates) if args.rates else None,
        "nproc_per_node": args.nproc_per_node, "hierarchical": tuple(args.hierarchical) if args.hierarchical else None,
    }.items() if value is not None}
    settings = replace(base, **overrides)
    settings = replace(settings, log_every=log_interval(settings.eval_every, settings.log_every))
    methods = args.methods or default_methods()
    work_dir = args.work_dir or os.path.join("/tmp", f"gcomp-bench-cluster-{os.getpid()}")
    os.makedirs(work_dir, exist_ok=True)

    print(f"benchmark on 2 emulated nodes x {settings.nproc_per_node} processes: methods {methods}, rates {list(settings.rates)}, {settings}", flush=True)
    started = time.perf_counter()
    try:
        results = run_matrix(methods, settings, work_dir, extra, args.timeout, show_progress=not args.no_progress)
    except ClusterError as error:
        print(f"bench_cluster.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_cluster.py: interrupted; namespaces removed", file=sys.stderr)
        return 130
    targets = fill_targets(results, args.target_loss)
    fill_comm_time(results)

    print(f"\n{settings.steps} steps, model {settings.model}, batch {settings.batch_size}/worker, warm-up "
          f"{settings.warmup_steps}, PowerSGD rank {settings.rank}; target validation loss per rate: "
          + ", ".join(f"{rate} {value:.4f}" for rate, value in targets.items())
          + f"; {time.perf_counter() - started:.0f} s in all\n")
    print(markdown_table(results))
    if settings.nproc_per_node > 1:
        print("\n" + link_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"settings": asdict(settings), "extra_train_args": extra, "targets": targets, "results": results},
                      handle, indent=1)
        print(f"\nresults: {args.json}")
    if args.plots:
        for path in write_plots(results, args.plots):
            print(f"plot: {path}")
    return 0 if all(r["succeeded"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
