"""The CUDA kernels of the sparse and quantized message ops without a CUDA build of ``gcomp._C``.

When gcomp was installed with a CPU toolchain (or no nvcc), ``gcomp._C`` holds CPU kernels only.
If cupy is installed and can drive the GPU, the same ``csrc/sparse_kernels.cu`` and
``csrc/quantize_kernels.cu`` that a CUDAExtension would compile are compiled here at first use
by NVRTC (CUDA's run-time compiler), one program per source file,
loaded through ``cupy.RawModule`` and launched on torch's current CUDA stream, on torch's own
memory (zero-copy via DLPack). The bytes and sums are those of the compiled kernels: only the
host side differs, and it mirrors ``launch_*`` in ``csrc/sparse_kernels.cu`` launch by launch
(the launch plan is built by pure functions so CPU tests can compare the two).

Why not ``cupy.RawModule(code=...)`` directly: cupy appends ``-ftz=true`` to every NVRTC
compilation, which flushes float32 subnormals in the unpack arithmetic and would break the
bit-for-bit agreement with the CPU kernels. NVRTC is therefore called through cupy's binding with
``-ftz=false``, and the resulting cubin (cached on disk, keyed by source, options and
architecture) is loaded with ``cupy.RawModule(path=...)``.

cupy is never imported at module import time, only when a CUDA tensor first needs these kernels.
Sources are looked up in ``gcomp/csrc/`` (an installed wheel) and then ``<repo>/csrc/`` (a source
checkout or an editable install).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from gcomp.compress import quantize as quantize_reference
from gcomp.compress import sparse as reference

logger = logging.getLogger(__name__)

KERNEL_SOURCE = "sparse_kernels.cu"
QUANTIZE_KERNEL_SOURCE = "quantize_kernels.cu"
KERNEL_SOURCES = (KERNEL_SOURCE, QUANTIZE_KERNEL_SOURCE)
KERNEL_NAMESPACE = "gcomp::cuda::rtc::"  # the kernels' namespace when __CUDACC_RTC__ is defined

# Mirrors of constants in csrc/sparse_kernels.cu and csrc/include/gcomp/*.h (a test compares them).
THREADS = 256  # kThreads
PACK_TILE_ELEMENTS = 4096  # kPackTileElements
BITMAP_TILE_BYTES = 2048  # kBitmapTileBytes
RADIX_BINS = 256  # kRadixBins
MAX_GRID_BLOCKS = 1 << 20  # kMaxGridBlocks
INDEX_GROUP = 8  # format::kIndexGroup
RADIX_STATE_BYTES = 24  # sizeof(RadixState): prefix, mask, remaining
WORKSPACE_ALIGN = 256  # align_up
MAX_MESSAGES = 65535  # grid.y limit of the decode launches
QUANTIZE_THREADS = 256  # kQuantizeThreads
QUANTIZE_MAX_GRID_BLOCKS = 1 << 20  # kQuantizeMaxGridBlocks
_INT32_MAX = (1 << 31) - 1

# format::FloatKind, and the C++ type each torch dtype is read as.
FLOAT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CXX_TYPE = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "gcomp::format::Half16",
    torch.bfloat16: "gcomp::format::BFloat16Bits",
}
KEY_BITS = {torch.float32: 32, torch.float64: 64, torch.float16: 16, torch.bfloat16: 16}

# The descriptor structs of csrc/include/gcomp/{sparse_format,sparse_kernels}.h, byte for byte.
LAYER_SECTION = np.dtype(
    {
        "names": ["value_offset", "value_bytes", "index_offset", "index_bytes", "index_payload_bytes", "bits", "bitmap"],
        "formats": ["<i8"] * 5 + ["<i4"] * 2,
        "offsets": [0, 8, 16, 24, 32, 40, 44],
        "itemsize": 48,
    }
)
_LAYER_HEAD = ["offset", "numel", "k", "entry_base"]
PACK_LAYER = np.dtype(
    {
        "names": _LAYER_HEAD + ["first_tile", "first_index_item", "section"],
        "formats": ["<i8"] * 6 + [LAYER_SECTION],
        "offsets": [0, 8, 16, 24, 32, 40, 48],
        "itemsize": 96,
    }
)
UNPACK_LAYER = np.dtype(
    {
        "names": _LAYER_HEAD + ["first_group", "first_bitmap_tile", "section"],
        "formats": ["<i8"] * 6 + [LAYER_SECTION],
        "offsets": [0, 8, 16, 24, 32, 40, 48],
        "itemsize": 96,
    }
)
DECODE_PLAN = np.dtype(
    {
        "names": ["n_messages", "n_layers", "message_bytes", "total_entries", "total_groups", "total_bitmap_tiles"],
        "formats": ["<i8"] * 6,
        "offsets": [0, 8, 16, 24, 32, 40],
        "itemsize": 48,
    }
)

# Decoding error codes (DecodeError in sparse_layout_host.h) and their messages.
_DECODE_ERRORS = {
    1: "a bit-packed index is >= numel",
    2: "bit-packed indices are not strictly increasing",
    3: "the bitmap has a bit set at a position >= numel",
    4: "the bitmap's popcount differs from k",
}
_NO_DECODE_FAILURE = (1 << 64) - 1

# csrc/include/gcomp/quantize_kernels.h, byte for byte.
QUANTIZE_LAYER = np.dtype(
    {
        "names": ["offset", "numel", "first_tile", "scale_offset", "code_offset", "seed", "reserved"],
        "formats": ["<i8"] * 5 + ["<u4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 44],
        "itemsize": 48,
    }
)
QUANTIZE_PLAN = np.dtype(
    {
        "names": ["n_layers", "total_tiles", "chunk", "message_bytes"],
        "formats": ["<i8"] * 4,
        "offsets": [0, 8, 16, 24],
        "itemsize": 32,
    }
)


class KernelsUnavailable(RuntimeError):
    """The NVRTC kernels could not be built or loaded (already logged); callers fall back."""


# ------------------------------------------------------------------------------------------------
# Finding the sources and deciding whether this path can run
# ------------------------------------------------------------------------------------------------


def kernel_root() -> Optional[Path]:
    """The directory holding ``sparse_kernels.cu`` and ``include/gcomp/``, or None."""
    from ._sources import csrc_dir

    try:
        root = csrc_dir()
    except FileNotFoundError:
        return None
    if (root / KERNEL_SOURCE).is_file() and (root / "include" / "gcomp" / "sparse_kernels.h").is_file():
        return root
    return None


_failure: Optional[str] = None  # set when building the kernels failed: do not try again
# Per source file: a failure to build the quantize kernels leaves the sparse ones usable (and the
# quantize ops fall back to the twin through KernelsUnavailable).
_source_failures: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def _cupy_can_drive_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    if kernel_root() is None:
        logger.warning("cupy is installed but csrc/%s is not shipped with gcomp: no NVRTC kernels", KERNEL_SOURCE)
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception as error:  # a broken cupy install must not break gcomp
        logger.info("cupy is installed but unusable (%s): no NVRTC kernels", error)
        return False


def available(device: torch.device | str | None = None) -> bool:
    """True when CUDA tensors can run the NVRTC kernels (cupy importable and able to use the GPU).

    Cheap and import-free when cupy is absent. False after a failed compilation.
    """
    if _failure is not None:
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and _cupy_can_drive_gpu()


# ------------------------------------------------------------------------------------------------
# Compilation (NVRTC through cupy's binding) and loading (cupy.RawModule)
# ------------------------------------------------------------------------------------------------


# (bits, stochastic) instantiations of quantize_pack_kernel the launcher uses.
QUANTIZE_PACK_VARIANTS = ((1, False), (2, False), (2, True), (4, False), (4, True), (8, False), (8, True), (32, False))


def _quantize_pack_name(bits: int, stochastic: bool) -> str:
    return f"quantize_pack_kernel<{bits}, {'true' if stochastic else 'false'}>"


def _quantize_unpack_name(bits: int) -> str:
    return f"quantize_unpack_add_kernel<{bits}>"


def kernel_name_expressions(source: str = KERNEL_SOURCE) -> list[str]:
    """Every kernel (template instantiation) the launch plans of ``source`` use, as NVRTC name
    expressions."""
    if source == QUANTIZE_KERNEL_SOURCE:
        names = [_quantize_pack_name(bits, stochastic) for bits, stochastic in QUANTIZE_PACK_VARIANTS]
        names += [_quantize_unpack_name(bits) for bits in quantize_reference.QUANTIZE_BITS]
        return [KERNEL_NAMESPACE + name for name in names]
    names = [
        "init_radix_kernel",
        "radix_pick_digit_kernel",
        "scan_tiles_kernel",
        "encode_indices_kernel",
        "decode_groups_kernel",
        "bitmap_count_kernel",
        "bitmap_scan_kernel",
        "bitmap_decode_kernel",
        "gather_entries_kernel",
    ]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        names += [f"{kernel}<{CXX_TYPE[dtype]}>" for kernel in ("radix_histogram_kernel", "count_tile_kernel", "write_selected_kernel")]
        names.append(_add_message_name(dtype))
    return [KERNEL_NAMESPACE + name for name in names]


def _add_message_name(out_dtype: torch.dtype) -> str:
    scale = "double" if out_dtype == torch.float64 else "float"
    return f"add_message_kernel<{CXX_TYPE[out_dtype]}, {scale}>"


def cccl_include_dirs() -> list[str]:
    """Include directories of CCCL (cub, libcu++, thrust): cupy's bundled copy, else the toolkit's."""
    spec = importlib.util.find_spec("cupy")
    if spec is not None and spec.origin:
        bundle = Path(spec.origin).parent / "_core" / "include" / "cupy" / "_cccl"
        dirs = [bundle / "cub", bundle / "libcudacxx", bundle / "thrust"]
        if all(d.is_dir() for d in dirs):
            return [str(d) for d in dirs]
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        for include in (Path(root) / "include" / "cccl", Path(root) / "include"):  # CUDA 13, CUDA 12
            if (include / "cub").is_dir() and (include / "cuda" / "std").is_dir():
                return [str(include)]
    return []


def compile_options(root: Path, cccl_dirs: Sequence[str]) -> list[str]:
    """NVRTC options: exact float arithmetic (the format is bit-exact), C++17, the headers."""
    return [
        "--std=c++17",
        "-ftz=false",
        "-prec-div=true",
        "-prec-sqrt=true",
        "-fmad=false",
        "-diag-suppress=177",  # host-only constants unused in a device-only compilation
        f"-I{root / 'include'}",
        *(f"-I{d}" for d in cccl_dirs),
    ]


def _arch_option(nvrtc: Any, capability: int) -> tuple[str, str]:
    """(``-arch=...``, "cubin" or "ptx"): a cubin for a GPU NVRTC knows, else PTX for the newest."""
    try:
        supported = [int(arch) for arch in nvrtc.getSupportedArchs()]
    except Exception:
        supported = []
    if not supported or capability in supported:
        return f"-arch=sm_{capability}", "cubin"
    older = [arch for arch in supported if arch <= capability]
    return f"-arch=compute_{max(older) if older else min(supported)}", "ptx"  # the driver JITs PTX


def compile_kernels(
    nvrtc: Any, capability: int, root: Path, cccl_dirs: Sequence[str], source_name: str = KERNEL_SOURCE
) -> tuple[bytes, str, dict[str, str]]:
    """Compiles ``source_name`` (``sparse_kernels.cu`` or ``quantize_kernels.cu``); returns
    (binary, "cubin"/"ptx", name expression -> symbol).

    ``nvrtc`` is cupy's binding (``cupy.cuda.nvrtc``) or anything with the same functions.
    """
    source = (root / source_name).read_text(encoding="utf-8")
    arch, kind = _arch_option(nvrtc, capability)
    options = tuple(compile_options(root, cccl_dirs)) + (arch,)
    names = kernel_name_expressions(source_name)
    program = nvrtc.createProgram(source, source_name, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except Exception as error:
            raise RuntimeError(f"NVRTC failed to compile {source_name} ({error}):\n{nvrtc.getProgramLog(program)}") from None
        lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
        binary = nvrtc.getCUBIN(program) if kind == "cubin" else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return bytes(binary), kind, lowered


def _cache_dir() -> Path:
    base = os.environ.get("GCOMP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gcomp"
    )
    path = Path(base) / "nvrtc"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix="gcomp-nvrtc-"))


def _cache_key(nvrtc: Any, capability: int, root: Path, cccl_dirs: Sequence[str], source_name: str = KERNEL_SOURCE) -> str:
    digest = hashlib.sha256()
    for path in [root / source_name, *sorted((root / "include" / "gcomp").glob("*.h"))]:
        digest.update(path.read_bytes())
    names = kernel_name_expressions(source_name)
    digest.update(repr((compile_options(root, cccl_dirs), capability, nvrtc.getVersion(), names)).encode())
    return digest.hexdigest()[:32]


def _write_atomically(path: Path, data: bytes) -> None:
    """Several ranks may compile at once: each writes a private file and renames it into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


_kernels_lock = threading.Lock()
_kernels_by_device: dict[tuple[int, str], dict[str, Any]] = {}


def _load_kernels(device_index: int, source_name: str = KERNEL_SOURCE) -> dict[str, Any]:
    """name expression -> cupy RawKernel for one GPU (compiled, or taken from the disk cache)."""
    import cupy
    from cupy.cuda import nvrtc

    root = kernel_root()
    if root is None or not (root / source_name).is_file():
        raise RuntimeError(f"{source_name} is not shipped with gcomp")
    major, minor = torch.cuda.get_device_capability(device_index)
    capability = 10 * major + minor
    cccl_dirs = cccl_include_dirs()
    key = _cache_key(nvrtc, capability, root, cccl_dirs, source_name)
    cache = _cache_dir()
    names_path = cache / f"{key}.json"  # written last: its presence means the binary is complete
    entry = json.loads(names_path.read_text()) if names_path.is_file() else None
    if entry is None or not (cache / f"{key}.{entry['kind']}").is_file():
        logger.info("compiling %s with NVRTC for sm_%d (once; cached in %s)", source_name, capability, cache)
        binary, kind, lowered = compile_kernels(nvrtc, capability, root, cccl_dirs, source_name)
        _write_atomically(cache / f"{key}.{kind}", binary)
        entry = {"kind": kind, "lowered": lowered}
        _write_atomically(names_path, json.dumps(entry).encode())
    binary_path, lowered = cache / f"{key}.{entry['kind']}", entry["lowered"]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(path=str(binary_path))
        return {name: module.get_function(symbol) for name, symbol in lowered.items()}


def kernels(device: torch.device, source: str = KERNEL_SOURCE) -> dict[str, Any]:
    """The loaded kernels of ``source`` for ``device``; raises KernelsUnavailable (once logged) on
    failure. A failed sparse build turns the whole NVRTC path off (``available()`` is then False);
    a failed quantize build only sends the quantize ops to the twin."""
    global _failure
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _kernels_lock:
        if _failure is not None:
            raise KernelsUnavailable(_failure)
        if source in _source_failures:
            raise KernelsUnavailable(_source_failures[source])
        if (index, source) not in _kernels_by_device:
            try:
                _kernels_by_device[(index, source)] = _load_kernels(index, source)
            except Exception as error:
                failure = f"{type(error).__name__}: {error}"
                if source == KERNEL_SOURCE:
                    _failure = failure
                _source_failures[source] = failure
                logger.warning("NVRTC kernels of %s unavailable, using the pure-torch ops on CUDA: %s", source, failure)
                raise KernelsUnavailable(failure) from error
        return _kernels_by_device[(index, source)]


# ------------------------------------------------------------------------------------------------
# Launch plans: pure functions mirroring the C++ launchers (tested on CPU against the .cu)
# ------------------------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One kernel launch: ``args`` holds tensors (passed as device pointers) and numpy scalars."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple


class Zero(NamedTuple):
    """A stream-ordered memset (``cudaMemsetAsync`` in the C++ launcher)."""

    tensor: torch.Tensor


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_for(items: int) -> int:
    return min(max(ceil_div(items, THREADS), 1), MAX_GRID_BLOCKS)


def align_up(n: int) -> int:
    return ceil_div(n, WORKSPACE_ALIGN) * WORKSPACE_ALIGN


def _section_record(section: reference.LayerSection) -> tuple:
    return (
        section.value_offset,
        section.value_bytes,
        section.index_offset,
        section.index_bytes,
        section.index_payload_bytes,
        section.bits,
        int(section.bitmap),
    )


class PackDescription(NamedTuple):
    layers: np.ndarray  # PACK_LAYER records
    total_tiles: int
    total_entries: int
    total_index_items: int


def describe_pack(offsets: Sequence[int], layout: reference.SparseMessageLayout) -> PackDescription:
    """The PackLayer array and PackPlan totals, as ``topk_pack_cuda`` computes them."""
    records, tiles, index_items, entries = [], 0, 0, 0
    for offset, section in zip(offsets, layout.layers):
        records.append((offset, section.numel, section.k, entries, tiles, index_items, _section_record(section)))
        tiles += ceil_div(section.numel, PACK_TILE_ELEMENTS)
        index_items += reference.bitmap_bytes(section.numel) if section.bitmap else ceil_div(section.k, INDEX_GROUP)
        entries += section.k
    return PackDescription(np.array(records, dtype=PACK_LAYER), tiles, entries, index_items)


def pack_workspace_layout(n_layers: int, total_tiles: int, total_entries: int) -> dict[str, tuple[int, int]]:
    """name -> (byte offset, bytes) inside the pack workspace (``topk_pack_workspace_bytes``)."""
    sizes = [
        ("state", RADIX_STATE_BYTES * n_layers),
        ("histograms", 8 * RADIX_BINS * n_layers),
        ("tile_above", 8 * total_tiles),
        ("tile_equal", 8 * total_tiles),
        ("selected", 8 * total_entries),
    ]
    parts, cursor = {}, 0
    for name, size in sizes:
        parts[name] = (cursor, size)
        cursor += align_up(size)
    parts["total"] = (0, cursor)
    return parts


def _carve(workspace: torch.Tensor, part: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    offset, size = part
    return workspace[offset : offset + size].view(dtype)


def pack_launches(
    buffer: torch.Tensor,
    layers: torch.Tensor,
    description: PackDescription,
    value_dtype: torch.dtype,
    message: torch.Tensor,
    workspace: torch.Tensor,
) -> list:
    """The launches of ``launch_topk_pack`` / ``pack_for_input``, in order."""
    n_layers = len(description.layers)
    if n_layers == 0:
        return []
    parts = pack_workspace_layout(n_layers, description.total_tiles, description.total_entries)
    state = _carve(workspace, parts["state"], torch.uint8)
    histograms = _carve(workspace, parts["histograms"], torch.int64)
    tile_above = _carve(workspace, parts["tile_above"], torch.int64)
    tile_equal = _carve(workspace, parts["tile_equal"], torch.int64)
    selected = _carve(workspace, parts["selected"], torch.int64)
    in_type = CXX_TYPE[buffer.dtype]
    block = (THREADS, 1, 1)
    layer_grid = (ceil_div(n_layers, THREADS), 1, 1)
    tile_grid = (description.total_tiles, 1, 1)
    n = np.int64(n_layers)
    ns = KERNEL_NAMESPACE
    steps: list = [Launch(ns + "init_radix_kernel", layer_grid, block, (layers, n, state)), Zero(histograms)]
    for shift in range(KEY_BITS[buffer.dtype] - 8, -1, -8):
        steps.append(
            Launch(ns + f"radix_histogram_kernel<{in_type}>", tile_grid, block, (buffer, layers, n, state, histograms, np.int32(shift)))
        )
        steps.append(Launch(ns + "radix_pick_digit_kernel", layer_grid, block, (n, state, histograms, np.int32(shift))))
    steps.append(Launch(ns + f"count_tile_kernel<{in_type}>", tile_grid, block, (buffer, layers, n, state, tile_above, tile_equal)))
    steps.append(
        Launch(ns + "scan_tiles_kernel", (n_layers, 1, 1), block, (layers, n, np.int64(description.total_tiles), tile_above, tile_equal))
    )
    steps.append(
        Launch(
            ns + f"write_selected_kernel<{in_type}>",
            tile_grid,
            block,
            (buffer, layers, n, state, tile_above, tile_equal, np.int32(FLOAT_KIND[value_dtype]), message, selected),
        )
    )
    if description.total_index_items > 0:
        steps.append(
            Launch(
                ns + "encode_indices_kernel",
                (grid_for(description.total_index_items), 1, 1),
                block,
                (layers, n, np.int64(description.total_index_items), selected, message),
            )
        )
    return steps


class UnpackDescription(NamedTuple):
    layers: np.ndarray  # UNPACK_LAYER records
    plan: np.ndarray  # one DECODE_PLAN record (shape (1,): passed by value)


def describe_unpack(offsets: Sequence[int], layout: reference.SparseMessageLayout, n_messages: int) -> UnpackDescription:
    """The UnpackLayer array and DecodePlan, as ``decode_on_device`` computes them."""
    records, groups, bitmap_tiles, entries = [], 0, 0, 0
    for offset, section in zip(offsets, layout.layers):
        records.append((offset, section.numel, section.k, entries, groups, bitmap_tiles, _section_record(section)))
        if section.bitmap:
            bitmap_tiles += ceil_div(reference.bitmap_bytes(section.numel), BITMAP_TILE_BYTES)
        else:
            groups += ceil_div(section.k, INDEX_GROUP)
        entries += section.k
    plan = np.array([(n_messages, len(records), layout.message_bytes, entries, groups, bitmap_tiles)], dtype=DECODE_PLAN)
    return UnpackDescription(np.array(records, dtype=UNPACK_LAYER), plan)


def decode_workspace_bytes(plan: np.ndarray) -> int:
    return align_up(8 * int(plan["n_messages"][0]) * int(plan["total_bitmap_tiles"][0]))


def decode_launches(
    rows: torch.Tensor, layers: torch.Tensor, description: UnpackDescription, indices: torch.Tensor, status: torch.Tensor, workspace: torch.Tensor
) -> list:
    """The launches of ``launch_decode``, in order (``rows``: messages, 2-D contiguous)."""
    plan = description.plan
    n_messages, n_layers = int(plan["n_messages"][0]), int(plan["n_layers"][0])
    groups, bitmap_tiles = int(plan["total_groups"][0]), int(plan["total_bitmap_tiles"][0])
    if n_messages == 0 or n_layers == 0:
        return []
    ns, block, steps = KERNEL_NAMESPACE, (THREADS, 1, 1), []
    if groups > 0:
        steps.append(Launch(ns + "decode_groups_kernel", (grid_for(groups), n_messages, 1), block, (rows, layers, plan, indices, status)))
    if bitmap_tiles > 0:
        tile_counts = workspace.view(torch.int64)
        tiles = (bitmap_tiles, n_messages, 1)
        steps.append(Launch(ns + "bitmap_count_kernel", tiles, block, (rows, layers, plan, tile_counts, status)))
        steps.append(Launch(ns + "bitmap_scan_kernel", (n_layers, n_messages, 1), block, (layers, plan, tile_counts, status)))
        steps.append(Launch(ns + "bitmap_decode_kernel", tiles, block, (rows, layers, plan, tile_counts, indices)))
    return steps


def add_message_launches(
    out: torch.Tensor, rows: torch.Tensor, layers: torch.Tensor, description: UnpackDescription, value_dtype: torch.dtype, indices: torch.Tensor, scale: float
) -> list:
    """``launch_add_message`` for messages 0, 1, 2, ... in order (the fixed summation order)."""
    plan = description.plan
    n_layers, total_entries = int(plan["n_layers"][0]), int(plan["total_entries"][0])
    if total_entries == 0:
        return []
    typed_scale = np.float64(scale) if out.dtype == torch.float64 else np.float32(scale)
    name = KERNEL_NAMESPACE + _add_message_name(out.dtype)
    grid = (grid_for(total_entries), 1, 1)
    return [
        Launch(
            name,
            grid,
            (THREADS, 1, 1),
            (out, rows[m], layers, np.int64(n_layers), np.int64(total_entries), np.int32(FLOAT_KIND[value_dtype]), indices[m], typed_scale),
        )
        for m in range(rows.shape[0])
    ]


def gather_launches(
    rows: torch.Tensor, layers: torch.Tensor, description: UnpackDescription, value_dtype: torch.dtype, decoded: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
) -> list:
    """``launch_gather_entries``: values as raw bytes, indices made absolute."""
    plan = description.plan
    n_messages, total_entries = int(plan["n_messages"][0]), int(plan["total_entries"][0])
    if n_messages == 0 or total_entries == 0:
        return []
    return [
        Launch(
            KERNEL_NAMESPACE + "gather_entries_kernel",
            (grid_for(total_entries), n_messages, 1),
            (THREADS, 1, 1),
            (rows, layers, plan, np.int32(FLOAT_KIND[value_dtype]), decoded, values, indices),
        )
    ]


# ------------------------------------------------------------------------------------------------
# Running plans on torch's current stream
# ------------------------------------------------------------------------------------------------


def _upload(records: np.ndarray, device: torch.device) -> torch.Tensor:
    """Descriptor structs to the device (a synchronous copy: ``records`` may die afterwards)."""
    return torch.from_numpy(records.view(np.uint8).copy()).to(device)


def run(steps: Sequence, device: torch.device, source: str = KERNEL_SOURCE) -> None:
    """Launches ``steps`` (kernels of ``source``) on torch's current stream of ``device``; tensors
    go in through DLPack."""
    if not steps:
        return
    table = kernels(device, source)
    import cupy
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch_stream = torch.cuda.current_stream(index)
    with warnings.catch_warnings():
        # cupy 14 deprecates ExternalStream in favour of Stream.from_external, which needs the
        # stream protocol on torch's side; the raw pointer works on every cupy version.
        warnings.simplefilter("ignore", DeprecationWarning)
        stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        for step in steps:
            if isinstance(step, Zero):
                step.tensor.zero_()
                continue
            args = tuple(_kernel_argument(cupy, arg) for arg in step.args)
            table[step.kernel](step.grid, step.block, args)


def _kernel_argument(cupy: Any, arg: Any) -> Any:
    """A tensor becomes a cupy view of its bytes (the kernels take raw pointers, and cupy has no
    bfloat16 dtype to import through DLPack); numpy scalars and structs pass by value."""
    if isinstance(arg, torch.Tensor):
        if arg.numel() == 0:
            return np.uint64(0)  # never dereferenced: the kernels skip empty ranges
        if not arg.is_contiguous():
            raise ValueError("kernel arguments must be contiguous tensors")
        return cupy.from_dlpack(arg.detach().reshape(-1).view(torch.uint8))
    return arg


# ------------------------------------------------------------------------------------------------
# The ops (same checks and errors as the reference and the compiled kernels)
# ------------------------------------------------------------------------------------------------


def topk_pack(buffer: torch.Tensor, offsets: list[int], numels: list[int], ks: list[int], value_dtype: torch.dtype) -> torch.Tensor:
    op = "gcomp.topk_pack"
    if buffer.dtype not in reference.BUFFER_DTYPES:
        raise ValueError(f"{op}: buffer must be float32, float64, float16 or bfloat16, got {buffer.dtype}")
    if buffer.dim() != 1:
        raise ValueError(f"{op}: buffer must be 1-D, got {buffer.dim()}-D")
    if not buffer.is_contiguous():
        raise ValueError(f"{op}: buffer must be contiguous")
    layout = reference._checked_layout(op, offsets, numels, ks, value_dtype, buffer.numel())
    description = describe_pack(offsets, layout)
    if description.total_tiles >= _INT32_MAX:
        raise ValueError(f"{op}: bucket too large for one launch")
    message = torch.zeros(layout.message_bytes, dtype=torch.uint8, device=buffer.device)
    if not layout.layers:
        return message
    parts = pack_workspace_layout(len(layout.layers), description.total_tiles, description.total_entries)
    workspace = torch.empty(parts["total"][1], dtype=torch.uint8, device=buffer.device)
    layers = _upload(description.layers, buffer.device)
    run(pack_launches(buffer, layers, description, value_dtype, message, workspace), buffer.device)
    return message


def _decode(op: str, messages: torch.Tensor, offsets: list[int], layout: reference.SparseMessageLayout):
    """Validates on the device and raises on the host (one sync) before anything is written."""
    rows = reference._check_messages(op, messages, layout)
    n_messages = rows.shape[0]
    if n_messages > MAX_MESSAGES:
        raise ValueError(f"{op}: at most {MAX_MESSAGES} messages per call")
    description = describe_unpack(offsets, layout, n_messages)
    if int(description.plan["total_bitmap_tiles"][0]) >= _INT32_MAX:
        raise ValueError(f"{op}: bucket too large for one launch")
    device = messages.device
    layers = _upload(description.layers, device)
    indices = torch.empty((n_messages, layout.total_entries), dtype=torch.int64, device=device)
    status = torch.full((1,), -1, dtype=torch.int64, device=device)
    workspace = torch.empty(decode_workspace_bytes(description.plan), dtype=torch.uint8, device=device)
    run(decode_launches(rows, layers, description, indices, status, workspace), device)
    failure = int(status.item()) & _NO_DECODE_FAILURE
    if failure != _NO_DECODE_FAILURE:
        location, code = divmod(failure, 8)
        message, layer = divmod(location, len(layout.layers))
        reason = _DECODE_ERRORS.get(code, "unknown decoding error")
        raise ValueError(f"{op}: message {message}, layer {layer}: {reason} (corrupted or mismatched message)")
    return rows, layers, description, indices


def sparse_unpack_add_(
    out: torch.Tensor, messages: torch.Tensor, offsets: list[int], numels: list[int], ks: list[int], value_dtype: torch.dtype, scale: float
) -> None:
    op = "gcomp.sparse_unpack_add_"
    if out.dtype not in reference.BUFFER_DTYPES:
        raise ValueError(f"{op}: out must be float32, float64, float16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    if out.device != messages.device:
        raise ValueError(f"{op}: out is on {out.device} but messages are on {messages.device}")
    layout = reference._checked_layout(op, offsets, numels, ks, value_dtype, out.numel())
    reference._check_disjoint(op, offsets, numels)
    rows = reference._check_messages(op, messages, layout)
    if rows.shape[0] == 0 or not layout.layers:
        return
    rows, layers, description, indices = _decode(op, messages, offsets, layout)
    run(add_message_launches(out.view(-1), rows, layers, description, value_dtype, indices, scale), out.device)


def sparse_unpack(
    messages: torch.Tensor, offsets: list[int], numels: list[int], ks: list[int], value_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "gcomp.sparse_unpack"
    layout = reference._checked_layout(op, offsets, numels, ks, value_dtype, None)
    rows = reference._check_messages(op, messages, layout)
    n_messages, total = rows.shape[0], layout.total_entries
    values = torch.empty((n_messages, total), dtype=value_dtype, device=messages.device)
    indices = torch.empty((n_messages, total), dtype=torch.int64, device=messages.device)
    if n_messages > 0 and total > 0:
        rows, layers, description, decoded = _decode(op, messages, offsets, layout)
        raw_values = values.view(-1).view(torch.uint8)
        run(gather_launches(rows, layers, description, value_dtype, decoded, raw_values, indices), messages.device)
    if messages.dim() == 1:
        return values[0], indices[0]
    return values, indices


# ------------------------------------------------------------------------------------------------
# Quantized messages (csrc/quantize_kernels.cu)
# ------------------------------------------------------------------------------------------------


class QuantizeDescription(NamedTuple):
    layers: np.ndarray  # QUANTIZE_LAYER records
    plan: np.ndarray  # one QUANTIZE_PLAN record (shape (1,): passed by value)


def describe_quantize(
    offsets: Sequence[int], layout: quantize_reference.QuantizedMessageLayout, seeds: Optional[Sequence[int]] = None
) -> QuantizeDescription:
    """The QuantizeLayer array and QuantizePlan, as ``quantize_pack_cuda`` / ``quantize_unpack_add_cuda``
    compute them: one tile per chunk (for 32 bits too, where tiles only split the copying)."""
    records, tiles = [], 0
    for layer, (offset, section) in enumerate(zip(offsets, layout.layers)):
        seed = 0 if seeds is None else int(seeds[layer]) & 0xFFFFFFFF
        records.append((offset, section.numel, tiles, section.scale_offset, section.code_offset, seed, 0))
        tiles += ceil_div(section.numel, layout.chunk)
    plan = np.array([(len(records), tiles, layout.chunk, layout.message_bytes)], dtype=QUANTIZE_PLAN)
    return QuantizeDescription(np.array(records, dtype=QUANTIZE_LAYER), plan)


def quantize_grid(tiles: int) -> int:
    return min(max(tiles, 1), QUANTIZE_MAX_GRID_BLOCKS)


def quantize_pack_launches(
    buffer: torch.Tensor, layers: torch.Tensor, description: QuantizeDescription, bits: int, stochastic: bool, message: torch.Tensor
) -> list:
    """The launches of ``launch_quantize_pack``, in order (``message`` zero-filled)."""
    plan = description.plan
    tiles = int(plan["total_tiles"][0])
    if int(plan["n_layers"][0]) == 0 or tiles == 0:
        return []
    stochastic = stochastic and bits in (2, 4, 8)
    return [
        Launch(
            KERNEL_NAMESPACE + _quantize_pack_name(bits, stochastic),
            (quantize_grid(tiles), 1, 1),
            (QUANTIZE_THREADS, 1, 1),
            (buffer, layers, plan, message),
        )
    ]


def quantize_unpack_launches(
    out: torch.Tensor, messages: torch.Tensor, n_messages: int, layers: torch.Tensor, description: QuantizeDescription, bits: int, weight: float
) -> list:
    """The launches of ``launch_quantize_unpack_add``: one, adding every message in order."""
    plan = description.plan
    tiles = int(plan["total_tiles"][0])
    if int(plan["n_layers"][0]) == 0 or tiles == 0 or n_messages == 0:
        return []
    return [
        Launch(
            KERNEL_NAMESPACE + _quantize_unpack_name(bits),
            (quantize_grid(tiles), 1, 1),
            (QUANTIZE_THREADS, 1, 1),
            (out, messages, np.int64(n_messages), layers, plan, np.float32(weight)),
        )
    ]


def _check_quantize_buffer(op: str, tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype != torch.float32 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"{op}: expected {name} to be a contiguous 1-D float32 tensor; got {tensor.dtype} of shape {tuple(tensor.shape)}")


def _quantize_layout(op: str, extent: int, offsets: list[int], numels: list[int], bits: int, chunk: int):
    if len(offsets) != len(numels):
        raise ValueError(f"{op}: offsets and numels must have the same length (got {len(offsets)}, {len(numels)})")
    try:
        layout = quantize_reference.quantized_message_layout(numels, bits, chunk)
    except ValueError as error:
        raise ValueError(f"{op}: {error}") from None
    for offset, numel in zip(offsets, numels):
        if offset < 0 or offset + numel > extent:
            raise ValueError(f"{op}: layer [{offset}, {offset + numel}) lies outside the buffer of {extent} entries")
    return layout


def quantize_pack(
    buffer: torch.Tensor, offsets: list[int], numels: list[int], bits: int, chunk: int, seeds: Optional[list[int]] = None
) -> torch.Tensor:
    op = "gcomp.quantize_pack"
    _check_quantize_buffer(op, buffer, "buffer")
    layout = _quantize_layout(op, buffer.numel(), offsets, numels, bits, chunk)
    if seeds is not None and len(seeds) != len(numels):
        raise ValueError(f"{op}: one seed per layer expected ({len(numels)}); got {len(seeds)}")
    description = describe_quantize(offsets, layout, seeds)
    message = torch.zeros(layout.message_bytes, dtype=torch.uint8, device=buffer.device)  # padding stays zero
    if not layout.layers:
        return message
    layers = _upload(description.layers, buffer.device)
    steps = quantize_pack_launches(buffer, layers, description, bits, seeds is not None, message)
    run(steps, buffer.device, QUANTIZE_KERNEL_SOURCE)
    return message


def quantize_unpack_add_(
    out: torch.Tensor, messages: torch.Tensor, offsets: list[int], numels: list[int], bits: int, chunk: int, weight: float
) -> None:
    op = "gcomp.quantize_unpack_add_"
    _check_quantize_buffer(op, out, "out")
    layout = _quantize_layout(op, out.numel(), offsets, numels, bits, chunk)
    if messages.dtype != torch.uint8 or layout.message_bytes == 0 or messages.numel() % layout.message_bytes:
        raise ValueError(
            f"{op}: messages must be uint8 holding whole messages of {layout.message_bytes} bytes; "
            f"got {messages.dtype} with {messages.numel()} bytes"
        )
    if out.device != messages.device:
        raise ValueError(f"{op}: out is on {out.device} but messages are on {messages.device}")
    quantize_reference._check_disjoint(op, offsets, numels)
    n_messages = messages.numel() // layout.message_bytes
    if n_messages == 0:
        return
    description = describe_quantize(offsets, layout)
    layers = _upload(description.layers, out.device)
    flat = messages.contiguous().view(-1)
    if flat.data_ptr() % 8:  # the kernels read scales as aligned floats
        flat = flat.clone()
    run(quantize_unpack_launches(out, flat, n_messages, layers, description, bits, weight), out.device, QUANTIZE_KERNEL_SOURCE)
