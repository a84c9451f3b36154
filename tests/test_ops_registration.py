"""The ops as torch sees them (schemas, fakes, opcheck), backend selection, and the NVRTC path.

Nothing here needs a GPU. The CUDA side is checked as far as a CPU machine allows: fake CUDA
tensors get outputs of the right shape, dtype and device; the cupy/NVRTC launch plans match the
C++ launchers and kernel signatures argument by argument; the descriptor structs match the C++
layout byte for byte (compiled with nvcc); and, where an NVRTC library is installed, the kernels
really compile with the options the run-time path uses.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gcomp import native_cupy, ops
from gcomp.compress import sparse as reference

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
KERNELS_CU = CSRC / "sparse_kernels.cu"
requires_native = pytest.mark.skipif(not ops.native_available(), reason="gcomp._C is not built or GCOMP_NATIVE=0")

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BUFFER_DTYPES = VALUE_DTYPES + [torch.float64]
# (offsets, numels, ks): bit-packed and bitmap layers, one element, odd sizes, several tiles
LAYOUTS = [
    ([0], [1], [1]),
    ([0, 7, 1007], [7, 1000, 9001], [3, 10, 9000]),
    ([5, 0], [4100, 5], [2000, 5]),
    ([0, 3000, 3001], [3000, 1, 20000], [1500, 1, 17]),
]


# ------------------------------------------------------------------------------------------------
# Registration: schemas, fakes, opcheck
# ------------------------------------------------------------------------------------------------


@requires_native
def test_schemas_mark_the_in_place_op_mutable():
    schema = torch.ops.gcomp.sparse_unpack_add_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert not any(arg.alias_info for arg in torch.ops.gcomp.topk_pack.default._schema.arguments)
    assert not any(arg.alias_info for arg in torch.ops.gcomp.sparse_unpack.default._schema.arguments)


@requires_native
def test_python_fakes_are_registered():
    from torch._library.simple_registry import singleton

    for name in ("topk_pack", "sparse_unpack_add_", "sparse_unpack"):
        assert singleton.find(f"gcomp::{name}").fake_impl.kernel is not None, name


@requires_native
@pytest.mark.parametrize("buffer_dtype", BUFFER_DTYPES, ids=str)
def test_opcheck(buffer_dtype):
    offsets, numels, ks = [0, 1000, 1007], [1000, 7, 3000], [10, 7, 2000]
    x = torch.randn(4007, dtype=buffer_dtype)
    value_dtype = torch.float16 if buffer_dtype == torch.float64 else buffer_dtype
    message = torch.ops.gcomp.topk_pack(x, offsets, numels, ks, value_dtype)
    torch.library.opcheck(torch.ops.gcomp.topk_pack.default, (x, offsets, numels, ks, value_dtype))
    for messages in (message, torch.stack([message, message, message])):
        out = torch.zeros(4007, dtype=buffer_dtype)
        torch.library.opcheck(
            torch.ops.gcomp.sparse_unpack_add_.default, (out, messages, offsets, numels, ks, value_dtype, 0.25)
        )
        torch.library.opcheck(torch.ops.gcomp.sparse_unpack.default, (messages, offsets, numels, ks, value_dtype))


@pytest.fixture(params=["native", "no-native"])
def native_switch(request, monkeypatch):
    """Both ways a fake tensor is served: through the op's fake, or the same function directly."""
    if request.param == "native" and not ops.native_available():
        pytest.skip("gcomp._C is not built")
    monkeypatch.setenv(ops.NATIVE_ENV, "1" if request.param == "native" else "0")
    return request.param


@pytest.mark.parametrize("buffer_dtype", BUFFER_DTYPES, ids=str)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES, ids=str)
def test_fake_cuda_tensors_get_outputs_of_the_right_kind(native_switch, buffer_dtype, value_dtype):
    for offsets, numels, ks in LAYOUTS:
        layout = reference.sparse_message_layout(numels, ks, value_dtype)
        extent = max(o + n for o, n in zip(offsets, numels))
        with FakeTensorMode():
            buffer = torch.empty(extent, dtype=buffer_dtype, device="cuda")
            message = ops.topk_pack(buffer, offsets, numels, ks, value_dtype)
            assert (message.shape, message.dtype, message.device.type) == (
                (layout.message_bytes,),
                torch.uint8,
                "cuda",
            )
            gathered = torch.empty(3, layout.message_bytes, dtype=torch.uint8, device="cuda")
            values, indices = ops.sparse_unpack(gathered, offsets, numels, ks, value_dtype)
            assert values.shape == indices.shape == (3, layout.total_entries)
            assert (values.dtype, indices.dtype, values.device.type, indices.device.type) == (
                value_dtype,
                torch.int64,
                "cuda",
                "cuda",
            )
            values, indices = ops.sparse_unpack(message, offsets, numels, ks, value_dtype)
            assert values.shape == indices.shape == (layout.total_entries,)
            out = torch.zeros(extent, dtype=buffer_dtype, device="cuda")
            assert ops.sparse_unpack_add_(out, gathered, offsets, numels, ks, value_dtype, 0.5) is None
            assert (out.shape, out.dtype, out.device.type) == ((extent,), buffer_dtype, "cuda")


def test_fake_rejects_what_the_layout_rejects(native_switch):
    with FakeTensorMode():
        buffer = torch.empty(100, device="cuda")
        with pytest.raises(ValueError, match="k = 11"):
            ops.topk_pack(buffer, [0], [10], [11], torch.float16)
        with pytest.raises(ValueError, match="same length"):
            ops.sparse_unpack(torch.empty(8, dtype=torch.uint8, device="cuda"), [0, 5], [5], [1], torch.float32)


# ------------------------------------------------------------------------------------------------
# Backend selection and the environment switch
# ------------------------------------------------------------------------------------------------


def test_native_backend_on_this_machine(monkeypatch):
    monkeypatch.delenv(ops.NATIVE_ENV, raising=False)
    monkeypatch.delenv(ops.DEPRECATED_DISABLE_NATIVE_ENV, raising=False)
    assert ops.native_backend("cpu") == ("compiled-cpu" if ops.native_available() else "torch")
    if not torch.cuda.is_available():
        assert ops.native_backend("cuda") == "torch"
    monkeypatch.setenv(ops.NATIVE_ENV, "0")
    assert not ops.native_available()
    assert ops.native_backend("cpu") == ops.native_backend("cuda:0") == "torch"


def test_native_backend_prefers_compiled_then_cupy(monkeypatch):
    monkeypatch.delenv(ops.NATIVE_ENV, raising=False)
    monkeypatch.setattr(native_cupy, "available", lambda device=None: True)
    monkeypatch.setattr(ops, "_compiled_kernels_for", lambda device: device.type == "cpu")
    assert ops.native_backend("cuda") == "cupy-nvrtc"
    if ops.native_available():
        monkeypatch.setattr(ops, "_compiled_kernels_for", lambda device: True)
        assert ops.native_backend("cuda") == "compiled-cuda"
    monkeypatch.setenv(ops.NATIVE_ENV, "0")
    assert ops.native_backend("cuda") == "torch"


def test_deprecated_switch_still_works_and_warns(monkeypatch):
    monkeypatch.delenv(ops.NATIVE_ENV, raising=False)
    monkeypatch.setenv(ops.DEPRECATED_DISABLE_NATIVE_ENV, "1")
    with pytest.warns(DeprecationWarning, match="GCOMP_NATIVE=0"):
        assert ops.native_backend("cpu") == "torch"
    monkeypatch.setenv(ops.NATIVE_ENV, "1")  # the new name wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.native_enabled()


def test_cupy_is_not_imported_without_a_gpu():
    code = (
        "import sys, gcomp, gcomp.native_cupy, gcomp.ops as o; o.native_backend('cuda'); "
        "o.native_backend('cpu'); print('cupy' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        assert result.stdout.strip() == "False"


@requires_native
def test_a_failed_nvrtc_build_falls_back_to_the_twin(monkeypatch):
    """The wiring ops -> native_cupy -> KernelsUnavailable -> reference, exercised on CPU tensors."""

    def unavailable(device, source=None):
        raise native_cupy.KernelsUnavailable("no GPU here")

    monkeypatch.setattr(ops, "native_backend", lambda device: "cupy-nvrtc")
    monkeypatch.setattr(native_cupy, "kernels", unavailable)
    x = torch.randn(5000)
    args = ([0, 1000], [1000, 4000], [10, 3000], torch.bfloat16)
    message = ops.topk_pack(x, *args)
    assert torch.equal(message, reference.topk_pack(x, *args))
    out, expected = torch.zeros(5000), torch.zeros(5000)
    ops.sparse_unpack_add_(out, torch.stack([message, message]), *args, scale=0.5)
    reference.sparse_unpack_add_(expected, torch.stack([message, message]), *args, scale=0.5)
    assert torch.equal(out, expected)
    values, indices = ops.sparse_unpack(message, *args)
    assert torch.equal(indices, reference.sparse_unpack(message, *args)[1])


# ------------------------------------------------------------------------------------------------
# The NVRTC path against the C++ sources
# ------------------------------------------------------------------------------------------------


def kernel_signatures() -> dict[str, list[str]]:
    """kernel name -> parameter types, read from the __global__ definitions in sparse_kernels.cu."""
    text = KERNELS_CU.read_text(encoding="utf-8")
    signatures = {}
    for name, params in re.findall(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", text):
        types = []
        for param in params.split(","):
            tokens = param.replace("*", " * ").split()
            types.append(" ".join(token for token in tokens[:-1] if token != "const").replace(" *", "*"))
        signatures[name] = types
    return signatures


def launch_order_in_source(function: str) -> list[str]:
    """Kernel names in the order the C++ host function launches them (textually)."""
    text = KERNELS_CU.read_text(encoding="utf-8")
    start = text.index(function + "(")
    body = text[start : text.index("\n}\n", start)]
    return re.findall(r"(\w+)(?:<\w+>)?<<<", body)


def template_args(kernel: str) -> list[str]:
    match = re.search(r"<(.*)>$", kernel)
    return [arg.strip() for arg in match.group(1).split(",")] if match else []


ELEMENT_SIZE = {"float": 4, "double": 8, "gcomp::format::Half16": 2, "gcomp::format::BFloat16Bits": 2}
SCALAR_POINTEES = {"uint8_t": 1, "int64_t": 8, "long long": 8, "unsigned long long": 8}


def check_launch(launch: native_cupy.Launch, signatures: dict[str, list[str]]) -> None:
    assert launch.kernel.startswith(native_cupy.KERNEL_NAMESPACE)
    base = re.sub(r"<.*>$", "", launch.kernel[len(native_cupy.KERNEL_NAMESPACE) :])
    params = signatures[base]
    assert len(launch.args) == len(params), (launch.kernel, params)
    template = dict(zip(("In",) if base != "add_message_kernel" else ("Out", "Scale"), template_args(launch.kernel)))
    for position, (arg, ctype) in enumerate(zip(launch.args, params)):
        where = f"{launch.kernel} argument {position} ({ctype})"
        if ctype.endswith("*"):
            assert isinstance(arg, torch.Tensor) and arg.is_contiguous(), where
            pointee = ctype[:-1].strip()
            if pointee in ("In", "Out"):
                assert arg.element_size() == ELEMENT_SIZE[template[pointee]], where
            elif pointee in SCALAR_POINTEES:
                assert arg.element_size() == SCALAR_POINTEES[pointee], where
        elif ctype == "int64_t":
            assert isinstance(arg, np.int64), where
        elif ctype in ("int", "FloatKind"):
            assert isinstance(arg, np.int32), where
        elif ctype == "DecodePlan":
            assert isinstance(arg, np.ndarray) and arg.dtype == native_cupy.DECODE_PLAN and arg.shape == (1,), where
        elif ctype == "Scale":
            assert isinstance(arg, np.float64 if template["Scale"] == "double" else np.float32), where
        else:
            raise AssertionError(f"{where}: no rule for this parameter type")
    assert all(dim >= 1 for dim in launch.grid) and launch.block == (native_cupy.THREADS, 1, 1)


def first_occurrences(steps) -> list[str]:
    names = []
    for step in steps:
        if isinstance(step, native_cupy.Launch):
            base = re.sub(r"<.*>$", "", step.kernel[len(native_cupy.KERNEL_NAMESPACE) :])
            if base not in names:
                names.append(base)
    return names


@pytest.mark.parametrize("offsets,numels,ks", LAYOUTS)
@pytest.mark.parametrize("buffer_dtype", BUFFER_DTYPES, ids=str)
def test_launch_plans_match_the_cpp_launchers(offsets, numels, ks, buffer_dtype):
    signatures = kernel_signatures()
    value_dtype = torch.float16 if buffer_dtype == torch.float64 else buffer_dtype
    layout = reference.sparse_message_layout(numels, ks, value_dtype)
    extent = max(o + n for o, n in zip(offsets, numels))

    pack = native_cupy.describe_pack(offsets, layout)
    parts = native_cupy.pack_workspace_layout(len(numels), pack.total_tiles, pack.total_entries)
    steps = native_cupy.pack_launches(
        torch.zeros(extent, dtype=buffer_dtype),
        torch.from_numpy(pack.layers.view(np.uint8).copy()),
        pack,
        value_dtype,
        torch.zeros(layout.message_bytes, dtype=torch.uint8),
        torch.zeros(parts["total"][1], dtype=torch.uint8),
    )
    for step in steps:
        if isinstance(step, native_cupy.Launch):
            check_launch(step, signatures)
    assert first_occurrences(steps) == launch_order_in_source("pack_for_input")
    radix_passes = [s for s in steps if isinstance(s, native_cupy.Launch) and "radix_histogram" in s.kernel]
    assert len(radix_passes) == native_cupy.KEY_BITS[buffer_dtype] // 8
    assert pack.total_tiles == sum(-(-n // native_cupy.PACK_TILE_ELEMENTS) for n in numels)

    n_messages = 3
    unpack = native_cupy.describe_unpack(offsets, layout, n_messages)
    rows = torch.zeros(n_messages, layout.message_bytes, dtype=torch.uint8)
    layers = torch.from_numpy(unpack.layers.view(np.uint8).copy())
    decoded = torch.zeros(n_messages, layout.total_entries, dtype=torch.int64)
    status = torch.full((1,), -1, dtype=torch.int64)
    workspace = torch.zeros(native_cupy.decode_workspace_bytes(unpack.plan), dtype=torch.uint8)
    decode = native_cupy.decode_launches(rows, layers, unpack, decoded, status, workspace)
    add = native_cupy.add_message_launches(
        torch.zeros(extent, dtype=buffer_dtype), rows, layers, unpack, value_dtype, decoded, 0.5
    )
    values = torch.zeros(n_messages, layout.total_entries, dtype=value_dtype)
    gather = native_cupy.gather_launches(
        rows, layers, unpack, value_dtype, decoded, values.view(-1).view(torch.uint8), decoded.clone()
    )
    for step in decode + add + gather:
        check_launch(step, signatures)
    has_bitmap = any(section.bitmap for section in layout.layers)
    has_packed = not all(section.bitmap for section in layout.layers)
    expected_decode = [
        name
        for name in launch_order_in_source("launch_decode")
        if (name == "decode_groups_kernel" and has_packed) or (name != "decode_groups_kernel" and has_bitmap)
    ]
    assert first_occurrences(decode) == expected_decode
    assert [step.args[1].data_ptr() for step in add] == [rows[m].data_ptr() for m in range(n_messages)]
    assert first_occurrences(add) == launch_order_in_source("launch_add_message")[:1]
    assert first_occurrences(gather) == launch_order_in_source("launch_gather_entries")


def test_every_planned_kernel_is_compiled_by_name():
    planned = set(native_cupy.kernel_name_expressions())
    signatures = kernel_signatures()
    bases = {re.sub(r"<.*>$", "", name[len(native_cupy.KERNEL_NAMESPACE) :]) for name in planned}
    assert bases == set(signatures)  # every __global__ kernel, none missing, none invented


def test_mirrored_constants_match_the_sources():
    text = KERNELS_CU.read_text() + (CSRC / "include/gcomp/sparse_kernels.h").read_text()
    text += (CSRC / "include/gcomp/sparse_format.h").read_text() + (CSRC / "include/gcomp/sparse_layout_host.h").read_text()

    def constant(name):
        return re.search(rf"\b{name}\s*=\s*([^;]+);", text).group(1)

    assert int(constant("kThreads")) == native_cupy.THREADS
    assert constant("kPackTileElements") == str(native_cupy.PACK_TILE_ELEMENTS)
    assert constant("kBitmapTileBytes") == str(native_cupy.BITMAP_TILE_BYTES)
    assert int(constant("kRadixBins")) == native_cupy.RADIX_BINS
    assert constant("kMaxGridBlocks") == "int64_t(1) << 20" and native_cupy.MAX_GRID_BLOCKS == 1 << 20
    assert int(constant("kIndexGroup")) == native_cupy.INDEX_GROUP
    kinds = dict(re.findall(r"k(Float32|Float16|BFloat16|Float64) = (\d)", text))
    assert {torch.float32: int(kinds["Float32"]), torch.float16: int(kinds["Float16"]),
            torch.bfloat16: int(kinds["BFloat16"]), torch.float64: int(kinds["Float64"])} == native_cupy.FLOAT_KIND
    for code, reason in native_cupy._DECODE_ERRORS.items():
        assert f'return "{reason}";' in text
        assert re.search(rf"= {code},", text)
    radix_state = re.search(r"struct RadixState \{(.*?)\};", text, re.S).group(1)
    assert len(re.findall(r"(?:unsigned )?long long \w+;", radix_state)) * 8 == native_cupy.RADIX_STATE_BYTES
    assert "(n + 255) / 256 * 256" in text and native_cupy.WORKSPACE_ALIGN == 256


STRUCT_PROBE = r"""
#include <cstddef>
#include <cstdio>
#include "gcomp/sparse_kernels.h"
using namespace gcomp;
#define FIELD(T, f) std::printf(#T " " #f " %zu %zu\n", offsetof(T, f), sizeof(((T*)0)->f));
int main() {
  std::printf("LayerSection size %zu\n", sizeof(format::LayerSection));
  FIELD(format::LayerSection, value_offset) FIELD(format::LayerSection, value_bytes)
  FIELD(format::LayerSection, index_offset) FIELD(format::LayerSection, index_bytes)
  FIELD(format::LayerSection, index_payload_bytes) FIELD(format::LayerSection, bits)
  FIELD(format::LayerSection, bitmap)
  std::printf("PackLayer size %zu\n", sizeof(cuda::PackLayer));
  FIELD(cuda::PackLayer, offset) FIELD(cuda::PackLayer, numel) FIELD(cuda::PackLayer, k)
  FIELD(cuda::PackLayer, entry_base) FIELD(cuda::PackLayer, first_tile)
  FIELD(cuda::PackLayer, first_index_item) FIELD(cuda::PackLayer, section)
  std::printf("UnpackLayer size %zu\n", sizeof(cuda::UnpackLayer));
  FIELD(cuda::UnpackLayer, offset) FIELD(cuda::UnpackLayer, numel) FIELD(cuda::UnpackLayer, k)
  FIELD(cuda::UnpackLayer, entry_base) FIELD(cuda::UnpackLayer, first_group)
  FIELD(cuda::UnpackLayer, first_bitmap_tile) FIELD(cuda::UnpackLayer, section)
  std::printf("DecodePlan size %zu\n", sizeof(cuda::DecodePlan));
  FIELD(cuda::DecodePlan, n_messages) FIELD(cuda::DecodePlan, n_layers) FIELD(cuda::DecodePlan, message_bytes)
  FIELD(cuda::DecodePlan, total_entries) FIELD(cuda::DecodePlan, total_groups)
  FIELD(cuda::DecodePlan, total_bitmap_tiles)
  std::printf("DecodeStatus size %zu\n", sizeof(cuda::DecodeStatus));
  return 0;
}
"""


def test_descriptor_structs_match_the_cpp_layout(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: cannot build the layout probe")
    probe = tmp_path / "probe.cu"
    probe.write_text(STRUCT_PROBE)
    command = [nvcc, "-std=c++17", "-I", str(CSRC / "include"), str(probe), "-o", str(tmp_path / "probe")]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    output = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True).stdout
    dtypes = {
        "format::LayerSection": native_cupy.LAYER_SECTION,
        "cuda::PackLayer": native_cupy.PACK_LAYER,
        "cuda::UnpackLayer": native_cupy.UNPACK_LAYER,
        "cuda::DecodePlan": native_cupy.DECODE_PLAN,
    }
    sizes = dict(re.findall(r"^(\w+) size (\d+)$", output, re.M))
    for struct, dtype in dtypes.items():
        assert int(sizes[struct.split("::")[1]]) == dtype.itemsize, struct
    for struct, field, offset, size in re.findall(r"^(\S+::\w+) (\w+) (\d+) (\d+)$", output, re.M):
        dtype_field, dtype_offset = dtypes[struct].fields[field][:2]
        assert (int(offset), int(size)) == (dtype_offset, dtype_field.itemsize), f"{struct}.{field}"
    assert int(sizes["DecodeStatus"]) == 8  # read back as one int64


def test_device_only_compilation_has_no_host_constructs(tmp_path):
    """What NVRTC sees (``__CUDACC_RTC__``): no launches, runtime API or C++ standard headers.

    The gcomp sources are preprocessed with NVRTC's macros and no system include directory; CCCL
    headers resolve to empty stubs (they are known to work under NVRTC).
    """
    cpp = shutil.which("g++") or shutil.which("cpp")
    if cpp is None:
        pytest.skip("no C preprocessor")
    stubs = tmp_path / "stubs"
    for header in ("cub/block/block_reduce.cuh", "cub/block/block_scan.cuh", "cuda/std/cstdint", "cuda/std/cstring"):
        (stubs / header).parent.mkdir(parents=True, exist_ok=True)
        (stubs / header).write_text("")
    command = [cpp, "-E", "-P", "-x", "c++", "-nostdinc", "-D__CUDACC__", "-D__CUDACC_RTC__", "-D__CUDA_ARCH__=900",
               "-I", str(CSRC / "include"), "-I", str(stubs), str(KERNELS_CU)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # e.g. <cstdint> or <cuda_runtime_api.h> included
    code = result.stdout
    for construct in ("<<<", "cudaMemsetAsync", "cudaGetLastError", "cudaStream_t", "cudaError_t", "__builtin_"):
        assert construct not in code, construct
    assert "namespace rtc {" in code and "namespace {" not in code


class CtypesNvrtc:
    """The few NVRTC calls ``native_cupy.compile_kernels`` makes, on a libnvrtc found on disk."""

    class Error(RuntimeError):
        pass

    def __init__(self, path: str):
        # libnvrtc dlopens its builtins library by name: load the one beside it first.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status):
        if status != 0:
            raise self.Error(self.lib.nvrtcGetErrorString(status).decode())

    def getVersion(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def getSupportedArchs(self):
        return [80]  # forces the PTX branch, which the test then reads

    def createProgram(self, source, name, headers, include_names):
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None))
        return program

    def addNameExpression(self, program, name):
        self._check(self.lib.nvrtcAddNameExpression(program, name.encode()))

    def compileProgram(self, program, options):
        encoded = [option.encode() for option in options]
        self._check(self.lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)))

    def getProgramLog(self, program):
        size = ctypes.c_size_t()
        self._check(self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        self._check(self.lib.nvrtcGetProgramLog(program, log))
        return log.value.decode()

    def getLoweredName(self, program, name):
        lowered = ctypes.c_char_p()
        self._check(self.lib.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)))
        return lowered.value.decode()

    def getPTX(self, program):
        size = ctypes.c_size_t()
        self._check(self.lib.nvrtcGetPTXSize(program, ctypes.byref(size)))
        ptx = ctypes.create_string_buffer(size.value)
        self._check(self.lib.nvrtcGetPTX(program, ptx))
        return ptx.raw

    def destroyProgram(self, program):
        self.lib.nvrtcDestroyProgram(ctypes.byref(program))


def find_nvrtc() -> str | None:
    candidates = [ctypes.util.find_library("nvrtc")]
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(entry, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates += glob.glob(os.path.join(root, "lib64", "libnvrtc.so*"))
    for candidate in candidates:
        if candidate and "builtins" not in candidate and "alt" not in candidate:
            try:
                CtypesNvrtc(candidate).getVersion()
                return candidate
            except OSError:
                continue
    return None


def test_kernels_compile_with_nvrtc_as_the_runtime_path_does():
    """A real NVRTC compilation (skips where no libnvrtc is installed, as on CI's CPU machines)."""
    library = find_nvrtc()
    if library is None:
        pytest.skip("no libnvrtc found (pip install nvidia-cuda-nvrtc to run this check)")
    cccl = native_cupy.cccl_include_dirs()
    if not cccl:
        pytest.skip("no CCCL headers (cub, libcu++) found")
    ptx, kind, lowered = native_cupy.compile_kernels(CtypesNvrtc(library), 90, native_cupy.kernel_root(), cccl)
    assert kind == "ptx"
    text = ptx.decode(errors="replace")
    assert ".ftz" not in text  # subnormals kept: the unpack sums must equal the CPU kernels' bits
    assert set(lowered) == set(native_cupy.kernel_name_expressions())
    for symbol in lowered.values():
        assert re.search(rf"\.entry {re.escape(symbol)}\(", text), symbol


def test_descriptors_follow_the_cpp_bookkeeping():
    offsets, numels, ks = [10, 0, 5000], [4100, 10, 9000], [4000, 3, 9]
    layout = reference.sparse_message_layout(numels, ks, torch.float16)
    assert [s.bitmap for s in layout.layers] == [True, False, False]
    pack = native_cupy.describe_pack(offsets, layout)
    assert pack.layers["offset"].tolist() == offsets and pack.layers["k"].tolist() == ks
    assert pack.layers["entry_base"].tolist() == [0, 4000, 4003] and pack.total_entries == 4012
    assert pack.layers["first_tile"].tolist() == [0, 2, 3] and pack.total_tiles == 6
    assert pack.layers["first_index_item"].tolist() == [0, 513, 514] and pack.total_index_items == 516
    unpack = native_cupy.describe_unpack(offsets, layout, 4)
    assert unpack.layers["first_group"].tolist() == [0, 0, 1]
    assert unpack.layers["first_bitmap_tile"].tolist() == [0, 1, 1]
    assert unpack.plan.tolist() == [(4, 3, layout.message_bytes, 4012, 3, 1)]
    for records in (pack.layers, unpack.layers):
        for record, section in zip(records["section"], layout.layers):
            assert record.tolist() == (
                section.value_offset, section.value_bytes, section.index_offset, section.index_bytes,
                section.index_payload_bytes, section.bits, int(section.bitmap),
            )


@pytest.mark.parametrize("codec", ["reference", "ops"])
def test_messages_of_an_empty_bucket(codec):
    """No layers: 0-byte messages, one or several of them, are valid input everywhere."""
    module = reference if codec == "reference" else ops
    message = module.topk_pack(torch.randn(5), [], [], [], torch.float32)
    assert message.shape == (0,)
    for messages in (message, torch.empty(3, 0, dtype=torch.uint8)):
        values, indices = module.sparse_unpack(messages, [], [], [], torch.float32)
        assert values.shape == indices.shape == messages.shape
        out = torch.ones(5)
        module.sparse_unpack_add_(out, messages, [], [], [], torch.float32, 1.0)
        assert torch.equal(out, torch.ones(5))


@requires_native
def test_ops_trace_into_one_graph_with_torch_compile():
    """The ops appear in a full graph (fakes give the shapes) and compute what eager mode does."""
    offsets, numels, ks = [0, 100], [100, 200], [10, 150]

    def step(x, out):
        message = ops.topk_pack(x, offsets, numels, ks, torch.float16)
        ops.sparse_unpack_add_(out, torch.stack([message, message]), offsets, numels, ks, torch.float16, 0.5)
        return message, ops.sparse_unpack(message, offsets, numels, ks, torch.float16)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(300)
    out, out_eager = torch.zeros(300), torch.zeros(300)
    message, (values, indices) = compiled(x, out)
    message_eager, (values_eager, indices_eager) = step(x, out_eager)
    assert torch.equal(message, message_eager) and torch.equal(out, out_eager)
    assert torch.equal(values, values_eager) and torch.equal(indices, indices_eager)
    torch._dynamo.reset()
