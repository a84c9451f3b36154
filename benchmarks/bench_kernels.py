"""Kernel benchmark: native top-k pack/unpack vs the pure-torch twin vs a plain memcpy.

Why: the sparse codec only pays off if packing costs little next to moving the dense bytes. The
memcpy column (``Tensor.copy_`` of the same number of bytes) is the yardstick measured in the
same run, so ratios stay meaningful on a noisy shared machine; absolute numbers are not.

Throughput is GB/s of input read: the dense float32 buffer for pack, the gathered messages for
unpack (``--messages`` of them, added into one float32 buffer, as after an allgather). Each case
reports the median and the best of its timed calls; throughputs and ratios use the best, which
is the least disturbed by other processes on a shared machine. A native kernel and its memcpy
are timed in alternation (copy, call, copy, call, ...), so both see the same machine.

    python benchmarks/bench_kernels.py --quick                 # 1M and 4M elements (CI)
    python benchmarks/bench_kernels.py --json runs/kernels.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from gcomp import ops
from gcomp.compress import sparse as reference

FULL_SIZES = [1 << 20, 1 << 22, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 22]
DENSITIES = [0.001, 0.01, 0.1]


def time_calls(functions: list[Callable[[], object]], repeats: int) -> list[dict[str, float]]:
    """Median and best wall time in ms over ``repeats`` calls of each function, after one warm-up
    call each. The functions' calls alternate (f, g, f, g, ...), so a busy spell slows all alike."""
    for fn in functions:
        fn()
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, out in zip(functions, samples):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return [{"median_ms": statistics.median(s), "best_ms": min(s)} for s in samples]


def gigabytes_per_second(n_bytes: int, milliseconds: float) -> float:
    return n_bytes / (milliseconds * 1e-3) / 1e9


def bench_case(numel: int, density: float, n_messages: int, repeats: int, twin_repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(numel, generator=generator)
    layer = ([0], [numel], [max(1, int(density * numel))], torch.float32)
    native = ops.native_available()
    row: dict = {"numel": numel, "density": density, "k": layer[2][0], "messages": n_messages}

    message = reference.topk_pack(buffer, *layer)
    row["message_bytes"] = message.numel()
    messages = torch.stack(
        [message] + [reference.topk_pack(torch.randn(numel, generator=generator), *layer) for _ in range(n_messages - 1)]
    )
    out = torch.zeros(numel)

    pack_bytes = buffer.numel() * buffer.element_size()
    unpack_bytes = messages.numel()
    dense_copy = torch.empty_like(buffer)
    message_copy = torch.empty_like(messages)
    timings = {}
    timings["pack_twin"], timings["unpack_twin"] = time_calls(
        [lambda: reference.topk_pack(buffer, *layer), lambda: reference.sparse_unpack_add_(out, messages, *layer, 0.25)],
        twin_repeats,
    )
    # Each native kernel alternates with its memcpy (the memcpy alone when the extension is absent).
    for op, memcpy, kernel in (
        ("pack", lambda: dense_copy.copy_(buffer), lambda: torch.ops.gcomp.topk_pack(buffer, *layer)),
        (
            "unpack",
            lambda: message_copy.copy_(messages),
            lambda: torch.ops.gcomp.sparse_unpack_add_(out, messages, *layer, 0.25),
        ),
    ):
        results = time_calls([memcpy, kernel] if native else [memcpy], repeats)
        timings[f"{op}_memcpy"] = results[0]
        if native:
            timings[f"{op}_native"] = results[1]
    for name, timing in timings.items():
        n_bytes = pack_bytes if name.startswith("pack") else unpack_bytes
        row[name] = {**timing, "gb_per_s": gigabytes_per_second(n_bytes, timing["best_ms"])}
    if native:
        for op in ("pack", "unpack"):
            row[f"{op}_speedup_vs_twin"] = row[f"{op}_twin"]["best_ms"] / row[f"{op}_native"]["best_ms"]
            row[f"{op}_fraction_of_memcpy"] = row[f"{op}_memcpy"]["best_ms"] / row[f"{op}_native"]["best_ms"]
    return row


def markdown_table(rows: list[dict]) -> str:
    def cell(row: dict, key: str) -> str:
        return f"{row[key]['gb_per_s']:.2f}" if key in row else "-"

    def ratio(row: dict, key: str) -> str:
        return f"{row[key]:.1f}x" if key in row else "-"

    def percent(row: dict, key: str) -> str:
        return f"{100 * row[key]:.0f}%" if key in row else "-"

    lines = [
        "| elements | density | pack native GB/s | pack twin GB/s | memcpy GB/s | native/twin | native/memcpy "
        "| unpack native GB/s | unpack twin GB/s | memcpy GB/s | native/twin | native/memcpy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['numel'] / 2**20:g}M | {row['density']:g} | {cell(row, 'pack_native')} | {cell(row, 'pack_twin')} "
            f"| {cell(row, 'pack_memcpy')} | {ratio(row, 'pack_speedup_vs_twin')} | {percent(row, 'pack_fraction_of_memcpy')} "
            f"| {cell(row, 'unpack_native')} | {cell(row, 'unpack_twin')} | {cell(row, 'unpack_memcpy')} "
            f"| {ratio(row, 'unpack_speedup_vs_twin')} | {percent(row, 'unpack_fraction_of_memcpy')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M and 4M elements only (CI)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--messages", type=int, default=4, help="messages added per unpack (world size)")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed calls per native/memcpy case (default: 256 at 1M elements, fewer for larger ones, at least 4)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    for numel in QUICK_SIZES if args.quick else FULL_SIZES:
        large = numel >= 1 << 26  # the twin takes seconds here: time it once
        repeats = args.repeats if args.repeats is not None else max(4, (1 << 28) // numel)
        for density in DENSITIES:
            rows.append(
                bench_case(numel, density, args.messages, repeats=repeats, twin_repeats=1 if large else 5)
            )
    report = {
        "benchmark": "sparse top-k pack/unpack kernels",
        "native_available": ops.native_available(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "throughput_unit": "GB/s of input read (dense buffer for pack, gathered messages for unpack)",
        "results": rows,
    }
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
