"""Top-k bytes per rank as the world grows: allgather vs shared indices, measured and modelled.

Part 1 (``--worlds 2 4``): for each world size, that many gloo ranks on this machine train the
CharLM (``--model``) with top-k under both exchanges, side by side in the same processes and in
interleaved rounds (machine noise hits both alike). Per exchange: bytes per rank per compressed
step (``stats()``), median step time, host seconds in collectives, and the loss after the run.
The cost model (:func:`gcomp.hooks.topk.topk_step_cost`) is then checked against each point:
bytes exactly (from the bucket layouts the hook saw), time roughly (with link parameters
calibrated in the same run from two plain allreduces), and used to project W = 8, 16, 64 on that
link and on two datacenter links; ``--plot`` draws bytes per rank against W.

Part 2 (``--quality-steps N``, optional): N steps of ``launch/train.py`` on 2 workers for
EF14 and EF21 under both exchanges, and uncompressed DDP, to show what shared indices cost in loss.

    python benchmarks/bench_topk_scaling.py --worlds 2 4 --json benchmarks/results/topk_scaling.json \
        --plot benchmarks/results/topk_scaling.png --quality-steps 150 -- --data ../shared/data/tinyshakespeare.txt
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gcomp
from gcomp.comm.cost import Link
from gcomp.examples.charlm import Batches, CharLM, CharLMConfig, language_model_loss, load_corpus
from gcomp.comm import Transport
from gcomp.comm.cost import Collective
from gcomp.hooks.topk import topk_step_collectives, topk_step_cost

EXCHANGES = ("allgather", "shared_indices")
PROJECTED_WORLDS = (2, 4, 8, 16, 64)
DATACENTER_LINKS = {"1 Gbit/s, 50 us": Link(125e6, 50e-6), "10 Gbit/s, 20 us": Link(1.25e9, 20e-6)}


def _calibrate(world: int, repeats: int = 30) -> dict:
    """Latency and rate of this machine's gloo loopback, from ring-allreduce times of a tiny and a
    4 MiB tensor: ``t = 2 (W-1) latency + 2 (W-1)/W bytes / rate``."""
    def median_time(tensor: torch.Tensor) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    small = median_time(torch.zeros(2))
    big_bytes = 4 << 20
    big = median_time(torch.zeros(big_bytes // 4))
    latency = small / (2 * (world - 1))
    rate = 2 * (world - 1) / world * big_bytes / max(big - small, 1e-9)
    return {"latency": latency, "rate": rate}


def _replay(collectives: list[Collective], repeats: int = 20) -> float:
    """Median seconds of one step's collectives alone (same kinds and sizes, no compute around
    them): what the cost model's time describes, without the waiting for slower ranks that a
    training step adds on a shared machine."""
    transport = Transport()
    tensors = []
    for collective in collectives:
        if collective.kind == "allreduce":
            tensors.append(torch.zeros(collective.nbytes // 4))
        else:
            tensors.append(torch.zeros(collective.nbytes, dtype=torch.uint8))
    times = []
    for repeat in range(repeats):
        dist.barrier()
        began = time.perf_counter()
        for collective, tensor in zip(collectives, tensors):
            if collective.kind == "allreduce":
                transport.allreduce_sum_(tensor, None)
            elif collective.kind == "allgather":
                transport.allgather(tensor, None)
            else:
                transport.broadcast_(tensor, repeat % transport.world_size, None)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    link = _calibrate(world)
    config = CharLMConfig.preset(args.model)
    corpus = load_corpus(args.data, 2_000_000)

    def build(exchange: str) -> dict:
        torch.manual_seed(0)
        ddp = DistributedDataParallel(CharLM(config), bucket_cap_mb=args.bucket_cap_mb)
        state = gcomp.register(ddp, "topk", density=args.density, feedback=args.feedback, warmup_steps=args.warmup_steps, exchange=exchange)
        buckets: dict[int, list[list[int]]] = {}
        reduce = state.reduce

        def recording(buffer, layout, step):  # the bucket layouts, for the cost model
            buckets.setdefault(step, []).append([slot.numel for slot in layout.layers])
            return reduce(buffer, layout, step)

        state.reduce = recording
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        batches = Batches(corpus, config.context, args.batch_size, seed=0, rank=rank)
        return {"ddp": ddp, "state": state, "optimizer": optimizer, "batches": batches, "times": [], "buckets": buckets, "loss": None}

    def one_step(run: dict) -> float:
        x, y = run["batches"].next()
        dist.barrier()
        began = time.perf_counter()
        run["optimizer"].zero_grad()
        loss = language_model_loss(run["ddp"], x, y)
        loss.backward()
        run["optimizer"].step()
        run["state"].synchronize()
        run["loss"] = loss.item()
        return time.perf_counter() - began

    runs = {exchange: build(exchange) for exchange in EXCHANGES}
    for run in runs.values():  # warm-up, bucket rebuild, EF21's dense initialisation
        for _ in range(args.warmup_steps + 2):
            one_step(run)
        run["before"] = run["state"].stats()
    for _ in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps_per_round):
                run["times"].append(one_step(run))

    results = {}
    for exchange, run in runs.items():
        stats = run["state"].stats()
        before = run["before"]
        steps = len(run["times"])
        last_step = max(run["buckets"])
        loss = torch.tensor([run["loss"]], dtype=torch.float64)
        dist.all_reduce(loss)
        results[exchange] = {
            "steps_timed": steps,
            "steps_total": stats["steps"],
            "sent": stats["bytes_sent"] - before["bytes_sent"],
            "received": stats["bytes_received"] - before["bytes_received"],
            "collectives": stats["collectives"] - before["collectives"],
            "collective_seconds": stats["seconds"]["collective"] - before["seconds"]["collective"],
            "median_step_s": statistics.median(run["times"]),
            "buckets": run["buckets"][last_step],
            "final_loss": float(loss) / world,
            "replayed_s": _replay(topk_step_collectives(run["buckets"][last_step], density=args.density, exchange=exchange)),
        }
        run["state"].close()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as handle:
            json.dump({"world": world, "link": link, "ranks": gathered, "parameters": sum(p.numel() for p in runs["allgather"]["ddp"].parameters())}, handle)
    del runs
    gc.collect()
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        out_path = os.path.join(directory, "out.json")
        mp.spawn(_worker, args=(world, os.path.join(directory, "store"), args, out_path), nprocs=world, join=True)
        with open(out_path, encoding="utf-8") as handle:
            return json.load(handle)


def summarise(point: dict, args: argparse.Namespace) -> dict:
    """Per exchange: measured means per rank and step, and the cost model's prediction."""
    world = point["world"]
    link = Link(point["link"]["rate"], point["link"]["latency"])
    out = {}
    for exchange in EXCHANGES:
        ranks = [r[exchange] for r in point["ranks"]]
        steps = ranks[0]["steps_timed"]
        buckets = ranks[0]["buckets"]
        predicted = topk_step_cost(buckets, world, link, density=args.density, exchange=exchange)
        total_sent, total_received = sum(r["sent"] for r in ranks), sum(r["received"] for r in ranks)
        sent, received = total_sent / world / steps, total_received / world / steps
        out[exchange] = {
            "sent": sent,
            "received": received,
            "predicted_sent": predicted.sent,
            "predicted_received": predicted.received,
            # Summed over ranks and steps (the broadcast's root rotates): integers, compared exactly.
            "bytes_exact": total_sent == round(predicted.sent * world * steps) and total_received == round(predicted.received * world * steps),
            "collectives_per_step": ranks[0]["collectives"] / steps,
            "predicted_collectives": predicted.collectives,
            "median_step_s": statistics.median(r["median_step_s"] for r in ranks),
            "collective_s": statistics.fmean(r["collective_seconds"] for r in ranks) / steps,
            "predicted_collective_s": predicted.seconds,
            "replayed_s": statistics.median(r["replayed_s"] for r in ranks),
            "final_loss": ranks[0]["final_loss"],
            "buckets": buckets,
        }
    out["link"] = point["link"]
    return out


def project(buckets: list[list[int]], links: dict[str, Link], compute_s: float, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, link in links.items():
        for world in PROJECTED_WORLDS:
            row = {"link": name, "world": world}
            for exchange in EXCHANGES:
                cost = topk_step_cost(buckets, world, link, density=args.density, exchange=exchange)
                row[exchange] = {"counted": cost.sent + cost.received, "wire_sent": cost.wire_sent, "seconds": cost.seconds,
                                 "step_s": compute_s + cost.seconds}
            rows.append(row)
    return rows


def plot(path: str, buckets: list[list[int]], measured: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    link = Link(1.25e9, 20e-6)  # bytes do not depend on the link
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for exchange, color in zip(EXCHANGES, ("tab:red", "tab:blue")):
        costs = [topk_step_cost(buckets, w, link, density=args.density, exchange=exchange) for w in worlds]
        axis.plot(worlds, [(c.sent + c.received) / 1e6 for c in costs], color=color, label=f"{exchange}: sent + received (model)")
        axis.plot(worlds, [c.wire_sent / 1e6 for c in costs], color=color, linestyle="--", label=f"{exchange}: ring/tree wire bytes sent (model)")
        points = sorted((world, row[exchange]) for world, row in measured.items())

        axis.scatter([w for w, _ in points], [(r["sent"] + r["received"]) / 1e6 for _, r in points], color=color, zorder=3,
                     label=f"{exchange}: measured (gloo, this machine)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("world size W (ranks)")
    axis.set_ylabel("MB per rank per compressed step")
    axis.set_title(f"top-k {args.density:g} on CharLM {args.model}: bytes per rank vs W")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)


def quality(args: argparse.Namespace, extra: list[str]) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_training import run_method

    out = {"none": run_method("none", args.quality_steps, extra, 2)}
    for feedback in ("ef14", "ef21"):
        for exchange in EXCHANGES:
            records = run_method(f"topk-{feedback}", args.quality_steps, extra + ["--topk-exchange", exchange, "--density", str(args.density)], 2)
            out[f"topk-{feedback}-{exchange}"] = records
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--model", default="small")
    parser.add_argument("--data", default=None, help="corpus for part 1 (default: Python's stdlib sources)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--feedback", default="ef21")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--quality-steps", type=int, default=0, help="part 2: steps per launch/train.py run (0: skip)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for launch/train.py in part 2, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]

    measured = {world: summarise(measure(world, args), args) for world in args.worlds}
    for world, row in measured.items():
        link = row["link"]
        print(f"\n## W = {world} (loopback calibrated: {link['latency'] * 1e6:.0f} us per message, {link['rate'] / 1e6:.0f} MB/s)")
        print("| exchange | MB sent / rank / step | MB received | model (sent, received) | bytes exact | collectives / step (model) "
              "| median step (s) | collective s / step in training | same collectives replayed alone (s) | model s / step | loss after run |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for exchange in EXCHANGES:
            r = row[exchange]
            print(f"| {exchange} | {r['sent'] / 1e6:.4f} | {r['received'] / 1e6:.4f} | {r['predicted_sent'] / 1e6:.4f}, "
                  f"{r['predicted_received'] / 1e6:.4f} | {'yes' if r['bytes_exact'] else 'NO'} | {r['collectives_per_step']:g} "
                  f"({r['predicted_collectives']}) | {r['median_step_s']:.3f} | {r['collective_s']:.4f} | {r['replayed_s']:.4f} | {r['predicted_collective_s']:.4f} "
                  f"| {r['final_loss']:.4f} |")
    first = min(measured)
    buckets = measured[first]["allgather"]["buckets"]
    compute_s = measured[first]["allgather"]["median_step_s"] - measured[first]["allgather"]["collective_s"]
    links = {f"this machine's loopback (calibrated at W = {first})": Link(**measured[first]["link"]), **DATACENTER_LINKS}
    projection = project(buckets, links, compute_s, args)
    print(f"\n## Projection (cost model; compute {compute_s:.3f} s per step from W = {first}, no overlap)")
    print("| link | W | allgather MB / rank (sent + received) | shared MB / rank | allgather comm s | shared comm s | allgather step s | shared step s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in projection:
        a, s = row["allgather"], row["shared_indices"]
        print(f"| {row['link']} | {row['world']} | {a['counted'] / 1e6:.3f} | {s['counted'] / 1e6:.3f} | {a['seconds']:.4f} | {s['seconds']:.4f} "
              f"| {a['step_s']:.3f} | {s['step_s']:.3f} |")
    if args.plot:
        plot(args.plot, buckets, measured, args)
    quality_runs = quality(args, extra) if args.quality_steps else {}
    if quality_runs:
        print(f"\n## Quality: {args.quality_steps} steps, 2 workers, launch/train.py {' '.join(extra)}")
        print("| run | final train loss (mean of last 5 logs) | final validation loss | MB sent per rank in total |")
        print("|---|---|---|---|")
        for name, records in quality_runs.items():
            last = records[-1]
            tail = [r["loss"] for r in records[-5:]]
            sent = f"{last['bytes_sent'] / 1e6:.1f}" if last.get("bytes_sent") else "-"
            print(f"| {name} | {sum(tail) / len(tail):.4f} | {last['validation_loss']:.4f} | {sent} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"arguments": vars(args), "measured": measured, "projection": projection, "compute_s": compute_s,
                       "quality": quality_runs}, handle, indent=2)


if __name__ == "__main__":
    main()
