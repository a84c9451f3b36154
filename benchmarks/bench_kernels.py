"""Kernel benchmark: native top-k and quantize pack/unpack vs the pure-torch twin vs a plain memcpy.

Why: the sparse codec only pays off if packing costs little next to moving the dense bytes. The
memcpy column (``Tensor.copy_`` of the same number of bytes) is the yardstick measured in the
same run, so ratios stay meaningful on a noisy shared machine; absolute numbers are not.

Throughput is GB/s of input read: the dense float32 buffer for pack, the gathered messages for
unpack (``--messages`` of them, added into one float32 buffer, as after an allgather). Each case
reports the median and the best of its timed calls; throughputs and ratios use the best, which
is the least disturbed by other processes on a shared machine. A native kernel and its memcpy
are timed in alternation (copy, call, copy, call, ...), so both see the same machine.

The native kernels have SIMD levels (avx512, avx2, portable; see gcomp.ops.simd_level). By
default the level the CPU would run is measured; ``--levels avx512 avx2 portable`` measures each
(through GCOMP_SIMD) in one run, every level's calls again alternating with their own memcpy, and
prints one table per level. The CPU model and the levels measured head the output.

    python benchmarks/bench_kernels.py --quick                 # 1M and 4M elements (CI)
    python benchmarks/bench_kernels.py --json runs/kernels.json
    python benchmarks/bench_kernels.py --levels avx512 avx2 portable --json runs/kernels.json
    python benchmarks/bench_kernels.py --quantize --threads 2 --json runs/quantize_kernels.json

Unpack also gets a roofline bound per case. An unpack must read the messages and read and
write every output cache line an entry lands in, while the memcpy yardstick moves only the
message bytes (read and written). So ``bound = 2 * message bytes / (message bytes + 2 * 64 *
distinct output lines)``, the lines counted from the actual messages' indices, is the best
unpack / memcpy ratio any unpack could reach if it ran at memcpy's bandwidth; the table reports
the measured ratio as a fraction of it. A plain ``Tensor.index_add_`` of the same (already
decoded) entries into the same buffer, timed alongside, is a second yardstick: what torch's own
scatter costs without any decoding (it does not keep gcomp's summation order, so it is a speed
reference only). ``--no-index-add`` skips it.

``--quantize`` measures the quantized message kernels instead (``gcomp.ops.quantize_pack`` and
``quantize_unpack_add_``; bits 1, 2, 4, 8, one scale per ``--chunk`` entries, round to nearest).
There both directions are compared with a memcpy of the dense float32 buffer: pack reads it, and
unpack reads and writes it (adding ``--messages`` decoded messages), so GB/s is float32 bytes of
the buffer per second for both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from gcomp import ops
from gcomp.compress import quantize as quantize_reference
from gcomp.compress import sparse as reference

FULL_SIZES = [1 << 20, 1 << 22, 1 << 24, 1 << 26]
QUICK_SIZES = [1 << 20, 1 << 22]
DENSITIES = [0.001, 0.01, 0.1]
QUANTIZE_BITS = [1, 2, 4, 8]
CACHE_LINE_BYTES = 64


def unpack_roofline(messages: torch.Tensor, layer: tuple, out: torch.Tensor) -> dict:
    """The least traffic an unpack of ``messages`` into ``out`` must move, and the best unpack /
    memcpy ratio it allows.

    An unpack reads every message byte and reads and writes each output cache line at least one
    entry lands in (counted over all messages: a line shared by several messages can be fetched
    once if they are added together). A memcpy of the messages moves 2 x their bytes. At equal
    bandwidth the unpack can therefore run at most ``memcpy bytes / unpack bytes`` as fast."""
    _, indices = reference.sparse_unpack(messages, *layer)
    elements_per_line = CACHE_LINE_BYTES // out.element_size()
    first_line = out.data_ptr() % CACHE_LINE_BYTES // out.element_size()  # out's offset into its first line
    lines = torch.unique((indices.reshape(-1) + first_line) // elements_per_line).numel()
    message_bytes = messages.numel()
    unpack_bytes = message_bytes + 2 * CACHE_LINE_BYTES * lines
    return {
        "message_bytes": message_bytes,
        "entries": indices.numel(),
        "distinct_output_lines": lines,
        "unpack_min_bytes": unpack_bytes,
        "memcpy_bytes": 2 * message_bytes,
        "bound_fraction_of_memcpy": 2 * message_bytes / unpack_bytes,
    }


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


def cpu_model() -> str:
    """The CPU's model name (platform.processor() only says x86_64 on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd_flags() -> list[str]:
    """The /proc/cpuinfo flags that decide the SIMD level (what the CPU has, whatever runs)."""
    wanted = {"avx2", "bmi2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def with_simd_level(level: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with GCOMP_SIMD=level (None: as the environment says)."""
    if level is None:
        return fn

    def run() -> object:
        previous = os.environ.get("GCOMP_SIMD")
        os.environ["GCOMP_SIMD"] = level
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["GCOMP_SIMD"]
            else:
                os.environ["GCOMP_SIMD"] = previous

    return run


def bench_case(numel: int, density: float, n_messages: int, repeats: int, twin_repeats: int, level: str | None = None,
               twin: dict | None = None, index_add: bool = True) -> dict:
    """One case at one SIMD level (None: the default). ``twin``: the twin's timings (and the
    index_add_ yardstick's) from another level's row of the same case, reused (neither has levels)."""
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(numel, generator=generator)
    layer = ([0], [numel], [max(1, int(density * numel))], torch.float32)
    native = ops.native_available()
    row: dict = {"numel": numel, "density": density, "k": layer[2][0], "messages": n_messages}
    if native:
        row["simd_level"] = with_simd_level(level, ops.simd_level)()

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
    if twin is not None:
        timings["pack_twin"], timings["unpack_twin"] = twin["pack_twin"], twin["unpack_twin"]
        row["unpack_roofline"] = twin["unpack_roofline"]
    else:
        timings["pack_twin"], timings["unpack_twin"] = time_calls(
            [lambda: reference.topk_pack(buffer, *layer),
             lambda: reference.sparse_unpack_add_(out, messages, *layer, 0.25)],
            twin_repeats,
        )
        row["unpack_roofline"] = unpack_roofline(messages, layer, out)
    if index_add and twin is not None and "unpack_index_add" in twin:
        timings["unpack_index_add"] = twin["unpack_index_add"]
    elif index_add:
        # torch's scatter of the same entries, decoded beforehand, alternating with the same memcpy.
        entry_values, entry_indices = reference.sparse_unpack(messages, *layer)
        entry_values, entry_indices = entry_values.reshape(-1), entry_indices.reshape(-1)
        timings["unpack_index_add_memcpy"], timings["unpack_index_add"] = time_calls(
            [lambda: message_copy.copy_(messages), lambda: out.index_add_(0, entry_indices, entry_values, alpha=0.25)],
            repeats,
        )
    # Each native kernel alternates with its memcpy (the memcpy alone when the extension is absent).
    for op, memcpy, kernel in (
        ("pack", lambda: dense_copy.copy_(buffer), with_simd_level(level, lambda: torch.ops.gcomp.topk_pack(buffer, *layer))),
        (
            "unpack",
            lambda: message_copy.copy_(messages),
            with_simd_level(level, lambda: torch.ops.gcomp.sparse_unpack_add_(out, messages, *layer, 0.25)),
        ),
    ):
        results = time_calls([memcpy, kernel] if native else [memcpy], repeats)
        timings[f"{op}_memcpy"] = results[0]
        if native:
            timings[f"{op}_native"] = results[1]
    for name, timing in timings.items():
        n_bytes = pack_bytes if name.startswith("pack") else unpack_bytes
        row[name] = {**{k: v for k, v in timing.items() if k != "gb_per_s"},
                     "gb_per_s": gigabytes_per_second(n_bytes, timing["best_ms"])}
    if native:
        for op in ("pack", "unpack"):
            row[f"{op}_speedup_vs_twin"] = row[f"{op}_twin"]["best_ms"] / row[f"{op}_native"]["best_ms"]
            row[f"{op}_fraction_of_memcpy"] = row[f"{op}_memcpy"]["best_ms"] / row[f"{op}_native"]["best_ms"]
        row["unpack_fraction_of_bound"] = (
            row["unpack_fraction_of_memcpy"] / row["unpack_roofline"]["bound_fraction_of_memcpy"]
        )
    if "unpack_index_add" in row:
        # Against the memcpy timed alongside it (or, when reused from another level's row, this row's).
        memcpy = row.get("unpack_index_add_memcpy", row["unpack_memcpy"])
        row["index_add_fraction_of_memcpy"] = memcpy["best_ms"] / row["unpack_index_add"]["best_ms"]
    return row


def bench_quantize_case(numel: int, bits: int, chunk: int, n_messages: int, repeats: int, twin_repeats: int,
                        level: str | None = None, twin: dict | None = None) -> dict:
    """One quantize case at one SIMD level: pack of a ``numel``-entry float32 layer, and the
    unpack-add of ``n_messages`` messages into it, each alternating with a memcpy of the buffer."""
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(numel, generator=generator)
    layer = ([0], [numel], bits, chunk)
    native = ops.native_available()
    row: dict = {"numel": numel, "bits": bits, "chunk": chunk, "messages": n_messages}
    if native:
        row["simd_level"] = with_simd_level(level, ops.simd_level)()
    pack = quantize_reference.quantize_pack if not native else (lambda *a: torch.ops.gcomp.quantize_pack(*a, None))
    message = pack(buffer, *layer)
    row["message_bytes"] = message.numel()
    messages = torch.stack([message] + [pack(torch.randn(numel, generator=generator), *layer) for _ in range(n_messages - 1)])
    out = torch.zeros(numel)
    dense_copy = torch.empty_like(buffer)
    n_bytes = buffer.numel() * buffer.element_size()
    timings = {}
    if twin is not None:
        timings["pack_twin"], timings["unpack_twin"] = twin["pack_twin"], twin["unpack_twin"]
    else:
        timings["pack_twin"], timings["unpack_twin"] = time_calls(
            [lambda: quantize_reference.quantize_pack(buffer, *layer),
             lambda: quantize_reference.quantize_unpack_add_(out, messages, *layer, 0.25)],
            twin_repeats,
        )
    for op, kernel in (
        ("pack", with_simd_level(level, lambda: torch.ops.gcomp.quantize_pack(buffer, *layer, None))),
        ("unpack", with_simd_level(level, lambda: torch.ops.gcomp.quantize_unpack_add_(out, messages, *layer, 0.25))),
    ):
        memcpy = lambda: dense_copy.copy_(buffer)  # noqa: E731 (the same yardstick for both)
        results = time_calls([memcpy, kernel] if native else [memcpy], repeats)
        timings[f"{op}_memcpy"] = results[0]
        if native:
            timings[f"{op}_native"] = results[1]
    for name, timing in timings.items():
        row[name] = {**{k: v for k, v in timing.items() if k != "gb_per_s"},
                     "gb_per_s": gigabytes_per_second(n_bytes, timing["best_ms"])}
    if native:
        for op in ("pack", "unpack"):
            row[f"{op}_speedup_vs_twin"] = row[f"{op}_twin"]["best_ms"] / row[f"{op}_native"]["best_ms"]
            row[f"{op}_fraction_of_memcpy"] = row[f"{op}_memcpy"]["best_ms"] / row[f"{op}_native"]["best_ms"]
    return row


def cell(row: dict, key: str) -> str:
    """A timing's GB/s, or "-" when the row has none (no native build)."""
    return f"{row[key]['gb_per_s']:.2f}" if key in row else "-"


def ratio(row: dict, key: str) -> str:
    return f"{row[key]:.1f}x" if key in row else "-"


def percent(row: dict, key: str) -> str:
    return f"{100 * row[key]:.0f}%" if key in row else "-"


def quantize_markdown_table(rows: list[dict]) -> str:
    lines = [
        "| elements | bits | message bytes | pack native GB/s | pack twin GB/s | memcpy GB/s | pack native/twin "
        "| pack native/memcpy | unpack native GB/s | unpack twin GB/s | memcpy GB/s | unpack native/twin "
        "| unpack native/memcpy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['numel'] / 2**20:g}M | {row['bits']} | {row['message_bytes']} | {cell(row, 'pack_native')} "
            f"| {cell(row, 'pack_twin')} | {cell(row, 'pack_memcpy')} | {ratio(row, 'pack_speedup_vs_twin')} "
            f"| {percent(row, 'pack_fraction_of_memcpy')} | {cell(row, 'unpack_native')} | {cell(row, 'unpack_twin')} "
            f"| {cell(row, 'unpack_memcpy')} | {ratio(row, 'unpack_speedup_vs_twin')} "
            f"| {percent(row, 'unpack_fraction_of_memcpy')} |"
        )
    return "\n".join(lines)


def print_machine(levels: list[str | None]) -> str:
    """Print the CPU, its SIMD flags, torch and the levels about to run; return the CPU model."""
    model = cpu_model()
    print(f"CPU: {model} ({os.cpu_count()} logical CPUs; flags: {' '.join(cpu_simd_flags()) or '-'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("SIMD levels measured: " + ", ".join(with_simd_level(level, ops.simd_level)() for level in levels))
    return model


def main_quantize(args: argparse.Namespace, levels: list[str | None]) -> None:
    model = print_machine(levels)
    rows = []
    for numel in QUICK_SIZES if args.quick else FULL_SIZES:
        large = numel >= 1 << 26  # the twin takes seconds here: time it once
        repeats = args.repeats if args.repeats is not None else max(4, (1 << 28) // numel)
        for bits in QUANTIZE_BITS:
            twin = None
            for level in levels:
                row = bench_quantize_case(numel, bits, args.chunk, args.messages, repeats=repeats,
                                          twin_repeats=1 if large else 5, level=level, twin=twin)
                twin = twin or {"pack_twin": row["pack_twin"], "unpack_twin": row["unpack_twin"]}
                rows.append(row)
    report = {
        "benchmark": "quantize pack/unpack kernels",
        "native_available": ops.native_available(),
        "simd_levels": [with_simd_level(level, ops.simd_level)() for level in levels],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_simd_flags": cpu_simd_flags(),
        "chunk": args.chunk,
        "rounding": "nearest",
        "throughput_unit": "GB/s of the dense float32 buffer (read by pack; read and written by unpack, "
                           f"which adds {args.messages} messages); memcpy copies that buffer",
        "results": rows,
    }
    for level in levels:
        name = with_simd_level(level, ops.simd_level)()
        print(f"\nSIMD level: {name}")
        print(quantize_markdown_table([row for row in rows if row.get("simd_level", "none") == name]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


def bound_cell(row: dict) -> str:
    """The roofline bound on unpack / memcpy (see unpack_roofline)."""
    return f"{100 * row['unpack_roofline']['bound_fraction_of_memcpy']:.1f}%" if "unpack_roofline" in row else "-"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| elements | density | pack native GB/s | pack twin GB/s | memcpy GB/s | native/twin | native/memcpy "
        "| unpack native GB/s | unpack twin GB/s | memcpy GB/s | native/twin | native/memcpy | bound | native/bound "
        "| index_add_/memcpy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['numel'] / 2**20:g}M | {row['density']:g} | {cell(row, 'pack_native')} | {cell(row, 'pack_twin')} "
            f"| {cell(row, 'pack_memcpy')} | {ratio(row, 'pack_speedup_vs_twin')} | {percent(row, 'pack_fraction_of_memcpy')} "
            f"| {cell(row, 'unpack_native')} | {cell(row, 'unpack_twin')} | {cell(row, 'unpack_memcpy')} "
            f"| {ratio(row, 'unpack_speedup_vs_twin')} | {percent(row, 'unpack_fraction_of_memcpy')} | {bound_cell(row)} "
            f"| {percent(row, 'unpack_fraction_of_bound')} | {percent(row, 'index_add_fraction_of_memcpy')} |"
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
    parser.add_argument(
        "--levels", nargs="+", choices=["avx512", "avx2", "portable"], default=None,
        help="SIMD levels to measure, one table each (default: the level that runs without GCOMP_SIMD)",
    )
    parser.add_argument(
        "--no-index-add", dest="index_add", action="store_false",
        help="skip the Tensor.index_add_ yardstick of the unpack (timed once per case, with the first level)",
    )
    parser.add_argument("--quantize", action="store_true", help="measure the quantize kernels (bits 1, 2, 4, 8)")
    parser.add_argument("--chunk", type=int, default=256, help="entries per scale for --quantize")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    levels: list[str | None] = list(args.levels) if args.levels else [None]
    if not ops.native_available():
        levels = [None]
    if args.quantize:
        main_quantize(args, levels)
        return

    model = print_machine(levels)
    rows = []
    for numel in QUICK_SIZES if args.quick else FULL_SIZES:
        large = numel >= 1 << 26  # the twin takes seconds here: time it once
        repeats = args.repeats if args.repeats is not None else max(4, (1 << 28) // numel)
        for density in DENSITIES:
            twin = None
            for level in levels:
                row = bench_case(numel, density, args.messages, repeats=repeats, twin_repeats=1 if large else 5,
                                 level=level, twin=twin, index_add=args.index_add)
                twin = twin or {key: row[key] for key in ("pack_twin", "unpack_twin", "unpack_roofline", "unpack_index_add")
                                if key in row}
                rows.append(row)
    report = {
        "benchmark": "sparse top-k pack/unpack kernels",
        "native_available": ops.native_available(),
        "simd_levels": [with_simd_level(level, ops.simd_level)() for level in levels],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": model,
        "cpu_simd_flags": cpu_simd_flags(),
        "throughput_unit": "GB/s of input read (dense buffer for pack, gathered messages for unpack)",
        "unpack_bound": "2 x message bytes / (message bytes + 2 x 64 x distinct output cache lines): the best "
                        "unpack / memcpy ratio at memcpy's bandwidth",
        "results": rows,
    }
    for level in levels:
        name = with_simd_level(level, ops.simd_level)()
        print(f"\nSIMD level: {name}")
        print(markdown_table([row for row in rows if row.get("simd_level", "none") == name]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
