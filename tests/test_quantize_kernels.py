"""The native quantize kernels against the pure-torch twin (gcomp.compress.quantize), bit for bit.

Pack bytes and unpacked sums must be identical at every SIMD level, for every bits value, chunk
size, layer shape, weight and seed, and for inputs with zeros, subnormals, huge values, NaN and
infinities. Also: the ops as torch sees them (opcheck, fakes), argument errors, the routing in
gcomp.ops, and the cupy/NVRTC launch plans (checked on CPU against the CUDA sources).
"""
from __future__ import annotations

import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from gcomp import native_cupy, ops
from gcomp.compress import quantize as reference

NATIVE_MISSING_REASON = "gcomp._C is not built (pip install --no-build-isolation --use-pep517 -e .) or GCOMP_NATIVE=0"
requires_native = pytest.mark.skipif(not ops.native_available(), reason=NATIVE_MISSING_REASON)

REPO = Path(__file__).resolve().parent.parent
QUANTIZE_CU = REPO / "csrc" / "quantize_kernels.cu"
BITS = [1, 2, 4, 8, 32]
SIMD_LEVELS = ["avx512", "avx2", "portable"]
WEIGHTS = [1.0, 0.5, 1 / 3, -0.25, 1e-3]


def hypothesis_settings(max_examples: int) -> settings:
    return settings(deadline=None, max_examples=max_examples, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def supported_simd_levels() -> list[str]:
    if not ops.native_available():
        return []
    import gcomp._C

    return list(gcomp._C.supported_simd_levels())


def simd_level_params() -> list:
    supported = supported_simd_levels()
    params = []
    for level in SIMD_LEVELS:
        reason = NATIVE_MISSING_REASON if not ops.native_available() else f"this CPU lacks the {level} level (it runs: {supported})"
        params.append(pytest.param(level, id=level, marks=pytest.mark.skipif(level not in supported, reason=reason)))
    return params


@contextmanager
def forced_simd(level: str):
    previous = os.environ.get("GCOMP_SIMD")
    os.environ["GCOMP_SIMD"] = level
    try:
        yield
    finally:
        if previous is None:
            del os.environ["GCOMP_SIMD"]
        else:
            os.environ["GCOMP_SIMD"] = previous


def native_pack(buffer, offsets, numels, bits, chunk, seeds=None):
    return torch.ops.gcomp.quantize_pack(buffer, list(offsets), list(numels), bits, chunk, None if seeds is None else list(seeds))


def native_unpack_add_(out, messages, offsets, numels, bits, chunk, weight=1.0):
    torch.ops.gcomp.quantize_unpack_add_(out, messages, list(offsets), list(numels), bits, chunk, float(weight))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

SPECIALS = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-45, -1e-45, 1e-40, 1.17549435e-38, 3.4e38, -3.4e38, 1e30]


def fill(numel: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """float32 values of one flavour: the cases the format's rules are about."""
    x = torch.randn(numel, generator=generator)
    if kind == "wide":  # magnitudes over many binades, some chunks tiny, some huge
        x = x * torch.exp2(torch.randint(-140, 120, (numel,), generator=generator).float())
    elif kind == "zeros":
        x = x * (torch.rand(numel, generator=generator) < 0.1)
    elif kind == "subnormal":  # whole chunks of subnormals: 2^24 / m and levels / m overflow
        x = x * 1e-41
    elif kind == "ties":  # x * inverse lands on halves: round half to even
        x = torch.randint(-8, 9, (numel,), generator=generator).float() * 0.5
    elif kind == "specials":
        picks = torch.randint(0, len(SPECIALS), (numel,), generator=generator)
        mask = torch.rand(numel, generator=generator) < 0.05
        x = torch.where(mask, torch.tensor(SPECIALS)[picks], x)
    return x.contiguous()


@st.composite
def buckets(draw, max_numel: int = 5000):
    n_layers = draw(st.integers(1, 4))
    numels = []
    for _ in range(n_layers):
        if draw(st.integers(0, 6)) == 0:
            numels.append(draw(st.integers(33_000, 80_000)))  # several work units
        else:
            numels.append(draw(st.integers(1, max_numel)))
    gaps = draw(st.lists(st.integers(0, 9), min_size=n_layers, max_size=n_layers))
    order = draw(st.permutations(range(n_layers)))
    offsets = [0] * n_layers
    cursor = 0
    for layer, gap in zip(order, gaps):
        cursor += gap
        offsets[layer] = cursor
        cursor += numels[layer]
    total = cursor + draw(st.integers(0, 9))
    bits = draw(st.sampled_from(BITS))
    chunk = draw(st.sampled_from([8, 16, 24, 64, 256, 264, 1000, 4096]))
    kind = draw(st.sampled_from(["normal", "wide", "zeros", "subnormal", "ties", "specials"]))
    stochastic = draw(st.booleans())
    seeds = [draw(st.integers(-(2**40), 2**40)) for _ in range(n_layers)] if stochastic else None
    seed = draw(st.integers(0, 2**31 - 1))
    return offsets, numels, total, bits, chunk, kind, seeds, seed


@pytest.mark.parametrize("level", simd_level_params())
@hypothesis_settings(max_examples=80)
@given(bucket=buckets(), n_messages=st.integers(1, 4), weight=st.sampled_from(WEIGHTS), two_d=st.booleans())
def test_native_equals_twin_bitwise(level, bucket, n_messages, weight, two_d):
    offsets, numels, total, bits, chunk, kind, seeds, seed = bucket
    generator = torch.Generator().manual_seed(seed)
    with forced_simd(level):
        messages_native, messages_twin = [], []
        for _ in range(n_messages):
            x = fill(total, kind, generator)
            expected = reference.quantize_pack(x, offsets, numels, bits, chunk, seeds)
            got = native_pack(x, offsets, numels, bits, chunk, seeds)
            assert got.dtype == torch.uint8 and torch.equal(got, expected), f"pack differs at bytes {torch.nonzero(got != expected)[:8].flatten().tolist()}"
            messages_native.append(got)
            messages_twin.append(expected)
        stacked = torch.stack(messages_twin) if two_d else torch.cat(messages_twin)
        base = fill(total, "normal", generator)
        expected_out = reference.quantize_unpack_add_(base.clone(), stacked, offsets, numels, bits, chunk, weight)
        got_out = native_unpack_add_(base.clone(), stacked, offsets, numels, bits, chunk, weight)
        assert same_bits(got_out, expected_out), torch.nonzero(got_out.view(torch.int32) != expected_out.view(torch.int32))[:8].flatten().tolist()


@pytest.mark.parametrize("level", simd_level_params())
@pytest.mark.parametrize("chunk", [512, 4096, 8192])
def test_sign_sums_beyond_32_bits_at_every_level(level, chunk):
    """1 bit: every entry of a chunk at its maximum adds 2^24, so a chunk of 4096 sums to 2^36; the
    vector kernels keep per-lane int32 sums and must fold them into 64 bits before they overflow."""
    numel = 3 * chunk + 100
    x = torch.where(torch.arange(numel) % 3 == 0, -1.0, 1.0)
    x[chunk + 5] = 0.75  # one chunk not all at its maximum
    with forced_simd(level):
        expected = reference.quantize_pack(x, [0], [numel], 1, chunk)
        got = native_pack(x, [0], [numel], 1, chunk)
    assert torch.equal(got, expected)
    assert expected[:4].view(torch.float32).item() == 1.0  # the scale: mean |x| of an all-ones chunk


@requires_native
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("chunk", [8, 24, 256, 4096])
@pytest.mark.parametrize("kind", ["normal", "wide", "zeros", "subnormal", "ties", "specials"])
def test_every_bits_chunk_and_input_kind(bits, chunk, kind):
    """A fixed grid next to the fuzzing: every combination runs on every build."""
    generator = torch.Generator().manual_seed(bits * 1000 + chunk)
    numels = [1, 7, chunk + 3, 3000, 70_001]
    offsets = list(np.cumsum([0] + numels[:-1]))
    x = fill(sum(numels), kind, generator)
    for seeds in (None, [11, -3, 2**33 + 5, 0, 123456789]):
        expected = reference.quantize_pack(x, offsets, numels, bits, chunk, seeds)
        got = native_pack(x, offsets, numels, bits, chunk, seeds)
        assert torch.equal(got, expected)
    messages = torch.stack([expected, native_pack(fill(sum(numels), kind, generator), offsets, numels, bits, chunk)])
    for weight in (1.0, 0.5, 1 / 3):
        base = fill(sum(numels), "normal", generator)
        expected_out = reference.quantize_unpack_add_(base.clone(), messages, offsets, numels, bits, chunk, weight)
        got_out = native_unpack_add_(base.clone(), messages, offsets, numels, bits, chunk, weight)
        assert same_bits(got_out, expected_out)


@requires_native
def test_thread_count_does_not_change_results():
    x = fill(300_000, "wide", torch.Generator().manual_seed(3))
    offsets, numels = [0, 100_000], [100_000, 200_000]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            message = native_pack(x, offsets, numels, 4, 256, [1, 2])
            out = native_unpack_add_(torch.zeros(300_000), torch.stack([message] * 3), offsets, numels, 4, 256, 1 / 3)
            results.append((message, out))
    finally:
        torch.set_num_threads(previous)
    for message, out in results[1:]:
        assert torch.equal(message, results[0][0]) and same_bits(out, results[0][1])


# ------------------------------------------------------------------------------------------------
# The format's fixed rules, spelled out (what the twin and the kernels both must do)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["twin", "native"])
def test_format_rules_by_example(codec):
    if codec == "native" and not ops.native_available():
        pytest.skip(NATIVE_MISSING_REASON)
    pack = reference.quantize_pack if codec == "twin" else native_pack
    unpack = reference.quantize_unpack_add_ if codec == "twin" else native_unpack_add_
    x = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.0, 0.75, -0.25, 0.5])
    message = pack(x, [0], [8], 2, 8)
    assert message.numel() == 16
    assert struct.unpack("<f", bytes(message[:4].tolist()))[0] == 1.0
    # q = rint(x): 1, -0 (half to even), 0, -1, 0, 1, -0, 0 -> codes q + 1, 2 bits LSB first
    codes = [2, 1, 1, 0, 1, 2, 1, 1]
    assert message[8:10].tolist() == [sum(c << (2 * i) for i, c in enumerate(codes[:4])), sum(c << (2 * i) for i, c in enumerate(codes[4:]))]
    assert message[10:].tolist() == [0] * 6  # padding
    sign = pack(x, [0], [8], 1, 8)
    assert sign[8].item() == 0b10110101  # bit i set for x_i >= 0 (and for -0.0)
    assert struct.unpack("<f", bytes(sign[:4].tolist()))[0] == pytest.approx(0.53125)
    nan_chunk = pack(torch.tensor([1.0, float("nan")] + [0.0] * 6), [0], [8], 8, 8)
    assert nan_chunk[:4].view(torch.int32).item() == 0x7FC00000
    out = unpack(torch.zeros(8), nan_chunk, [0], [8], 8, 8)
    assert (out.view(torch.int32) == 0x7FC00000).all()  # the one canonical NaN everywhere
    inf_chunk = pack(torch.tensor([1.0, float("-inf")] + [0.0] * 6), [0], [8], 1, 8)
    assert inf_chunk[:4].view(torch.float32).item() == float("inf")


def test_twin_sign_scale_of_a_subnormal_chunk_is_exact():
    """2^24 / m overflows for subnormal m: zero entries count 0 and the rest 2^24 (not garbage)."""
    x = torch.tensor([1e-40, 0.0, -1e-40, 0.0, 0.0, 0.0, 0.0, 0.0])
    message = reference.quantize_pack(x, [0], [8], 1, 8)
    scale = message[:4].view(torch.float32).item()
    assert scale == pytest.approx(float(torch.tensor(2e-40 / 8)), rel=1e-6)


def test_twin_refuses_overlapping_layers_when_adding():
    message = reference.quantize_pack(torch.ones(16), [0, 4], [8, 8], 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        reference.quantize_unpack_add_(torch.zeros(16), message, [0, 4], [8, 8], 8, 8)


# ------------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------------


@requires_native
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: native_pack(torch.zeros(16, dtype=torch.float64), [0], [16], 8, 8), "float32"),
        (lambda: native_pack(torch.zeros(4, 4), [0], [16], 8, 8), "1-D"),
        (lambda: native_pack(torch.zeros(32)[::2], [0], [16], 8, 8), "contiguous"),
        (lambda: native_pack(torch.zeros(16), [0], [16], 3, 8), "bits must be one of"),
        (lambda: native_pack(torch.zeros(16), [0], [16], 8, 12), "chunk must be a multiple of 8"),
        (lambda: native_pack(torch.zeros(16), [0], [16], 8, 0), "chunk must be a multiple of 8"),
        (lambda: native_pack(torch.zeros(16), [0], [16], 8, 1 << 25), "chunk must be a multiple of 8"),
        (lambda: native_pack(torch.zeros(16), [0], [0], 8, 8), "numel 0"),
        (lambda: native_pack(torch.zeros(16), [8], [16], 8, 8), "outside the buffer"),
        (lambda: native_pack(torch.zeros(16), [-1], [4], 8, 8), "outside the buffer"),
        (lambda: native_pack(torch.zeros(16), [0, 8], [8], 8, 8), "same length"),
        (lambda: native_pack(torch.zeros(16), [0], [16], 8, 8, [1, 2]), "one seed per layer"),
        (lambda: native_unpack_add_(torch.zeros(16), torch.zeros(15, dtype=torch.uint8), [0], [16], 8, 8), "whole messages of 24 bytes"),
        (lambda: native_unpack_add_(torch.zeros(16), torch.zeros(24, dtype=torch.int8), [0], [16], 8, 8), "uint8"),
        (lambda: native_unpack_add_(torch.zeros(16, dtype=torch.float16), torch.zeros(24, dtype=torch.uint8), [0], [16], 8, 8), "float32"),
        (lambda: native_unpack_add_(torch.zeros(16), torch.zeros(64, dtype=torch.uint8), [0, 4], [8, 8], 8, 8), "overlap"),
        (lambda: native_unpack_add_(torch.zeros(16), torch.zeros(24, dtype=torch.uint8), [0], [16], 5, 8), "bits must be one of"),
    ],
)
def test_native_refuses_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("codec", ["twin", "native"])
def test_a_refused_unpack_leaves_out_untouched(codec):
    if codec == "native" and not ops.native_available():
        pytest.skip(NATIVE_MISSING_REASON)
    unpack = reference.quantize_unpack_add_ if codec == "twin" else native_unpack_add_
    out = torch.arange(16.0)
    with pytest.raises(ValueError):
        unpack(out, torch.zeros(25, dtype=torch.uint8), [0], [16], 8, 8)
    assert torch.equal(out, torch.arange(16.0))


@pytest.mark.parametrize("backend", ["twin", "native"])
def test_the_twin_and_the_op_refuse_the_same_arguments(backend, monkeypatch):
    """ops.* raises ValueError for these on both paths (GCOMP_NATIVE=0 and native)."""
    if backend == "native" and not ops.native_available():
        pytest.skip(NATIVE_MISSING_REASON)
    monkeypatch.setenv(ops.NATIVE_ENV, "0" if backend == "twin" else "1")
    for bits, chunk in ((3, 8), (8, 12), (True, 8)):
        with pytest.raises(ValueError):
            ops.quantize_pack(torch.zeros(16), [0], [16], bits, chunk)
    with pytest.raises(ValueError):
        ops.quantize_unpack_add_(torch.zeros(16), torch.zeros(15, dtype=torch.uint8), [0], [16], 8, 8)


# ------------------------------------------------------------------------------------------------
# The ops as torch sees them
# ------------------------------------------------------------------------------------------------


@requires_native
def test_schema_marks_out_mutable():
    schema = torch.ops.gcomp.quantize_unpack_add_.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write
    assert not any(arg.alias_info for arg in torch.ops.gcomp.quantize_pack.default._schema.arguments)


@requires_native
@pytest.mark.parametrize("bits", BITS)
def test_opcheck(bits):
    offsets, numels = [0, 1000, 1007], [1000, 7, 3000]
    x = torch.randn(4007)
    for seeds in (None, [1, 2, 3]):
        torch.library.opcheck(torch.ops.gcomp.quantize_pack.default, (x, offsets, numels, bits, 256, seeds))
    message = torch.ops.gcomp.quantize_pack(x, offsets, numels, bits, 256, None)
    for messages in (message, torch.stack([message, message, message])):
        torch.library.opcheck(
            torch.ops.gcomp.quantize_unpack_add_.default, (torch.zeros(4007), messages, offsets, numels, bits, 256, 0.25)
        )


@pytest.fixture(params=["native", "no-native"])
def native_switch(request, monkeypatch):
    if request.param == "native" and not ops.native_available():
        pytest.skip(NATIVE_MISSING_REASON)
    monkeypatch.setenv(ops.NATIVE_ENV, "1" if request.param == "native" else "0")
    return request.param


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("bits", BITS)
def test_fake_tensors_get_messages_of_the_right_size(native_switch, device, bits):
    offsets, numels, chunk = [0, 10, 1010], [10, 1000, 4097], 256
    layout = reference.quantized_message_layout(numels, bits, chunk)
    with FakeTensorMode():
        buffer = torch.empty(5107, device=device)
        message = ops.quantize_pack(buffer, offsets, numels, bits, chunk, [1, 2, 3])
        assert (message.shape, message.dtype, message.device.type) == ((layout.message_bytes,), torch.uint8, device)
        out = torch.zeros(5107, device=device)
        gathered = torch.empty(3, layout.message_bytes, dtype=torch.uint8, device=device)
        assert ops.quantize_unpack_add_(out, gathered, offsets, numels, bits, chunk, 0.5) is out
    with pytest.raises(ValueError, match="bits must be one of"):
        with FakeTensorMode():
            ops.quantize_pack(torch.empty(16, device=device), [0], [16], 3, 8)


@requires_native
def test_meta_kernels_give_the_message_size():
    layout = reference.quantized_message_layout([10, 1000], 4, 24)
    message = torch.ops.gcomp.quantize_pack(torch.empty(1010, device="meta"), [0, 10], [10, 1000], 4, 24, None)
    assert message.shape == (layout.message_bytes,) and message.device.type == "meta"


@requires_native
def test_ops_trace_with_torch_compile():
    offsets, numels = [0, 300], [300, 700]

    def step(x, out):
        message = ops.quantize_pack(x, offsets, numels, 4, 64)
        return ops.quantize_unpack_add_(out, torch.stack([message, message]), offsets, numels, 4, 64, 0.5)

    x = torch.randn(1000)
    expected = step(x, torch.zeros(1000))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert same_bits(compiled(x, torch.zeros(1000)), expected)


# ------------------------------------------------------------------------------------------------
# Routing in gcomp.ops
# ------------------------------------------------------------------------------------------------


def test_ops_route_to_the_twin_with_native_off(monkeypatch):
    monkeypatch.setenv(ops.NATIVE_ENV, "0")
    called = []
    original = reference.quantize_pack
    monkeypatch.setattr(reference, "quantize_pack", lambda *a, **k: called.append(1) or original(*a, **k))
    x = torch.randn(100)
    message = ops.quantize_pack(x, [0], [100], 8, 8)
    assert called and torch.equal(message, original(x, [0], [100], 8, 8))
    out = ops.quantize_unpack_add_(torch.zeros(100), message, [0], [100], 8, 8)
    assert same_bits(out, reference.quantize_unpack_add_(torch.zeros(100), message, [0], [100], 8, 8))


@requires_native
def test_ops_route_to_the_native_op(monkeypatch):
    monkeypatch.setenv(ops.NATIVE_ENV, "1")
    monkeypatch.setattr(reference, "quantize_pack", lambda *a, **k: pytest.fail("the twin ran"))
    monkeypatch.setattr(reference, "quantize_unpack_add_", lambda *a, **k: pytest.fail("the twin ran"))
    x = torch.randn(1000)
    message = ops.quantize_pack(x, np.array([0]), [torch.tensor(1000)], 2, 64, seeds=[np.int64(5)])
    out = torch.zeros(1000)
    assert ops.quantize_unpack_add_(out, message, [0], [1000], 2, 64) is out


@requires_native
def test_a_failed_nvrtc_build_falls_back_to_the_twin(monkeypatch):
    def unavailable(device, source=None):
        raise native_cupy.KernelsUnavailable("no GPU here")

    monkeypatch.setattr(ops, "native_backend", lambda device: "cupy-nvrtc")
    monkeypatch.setattr(native_cupy, "kernels", unavailable)
    x = torch.randn(5000)
    args = ([0, 1000], [1000, 4000], 4, 256)
    message = ops.quantize_pack(x, *args, seeds=[3, 4])
    assert torch.equal(message, reference.quantize_pack(x, *args, [3, 4]))
    out = ops.quantize_unpack_add_(torch.zeros(5000), torch.stack([message, message]), *args, weight=0.5)
    assert same_bits(out, reference.quantize_unpack_add_(torch.zeros(5000), torch.stack([message, message]), *args, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU tests above cover the same bytes")
@pytest.mark.parametrize("bits", BITS)
def test_cuda_equals_twin_bitwise(bits):
    generator = torch.Generator().manual_seed(bits)
    offsets, numels = [0, 5, 70_005], [5, 70_000, 3001]
    x = fill(73_006, "specials", generator)
    for seeds in (None, [1, 2, 3]):
        expected = reference.quantize_pack(x, offsets, numels, bits, 256, seeds)
        got = ops.quantize_pack(x.cuda(), offsets, numels, bits, 256, seeds)
        assert torch.equal(got.cpu(), expected)
    messages = torch.stack([expected, expected])
    base = fill(73_006, "normal", generator)
    want = reference.quantize_unpack_add_(base.clone(), messages, offsets, numels, bits, 256, 1 / 3)
    got = ops.quantize_unpack_add_(base.cuda(), messages.cuda(), offsets, numels, bits, 256, 1 / 3)
    assert same_bits(got.cpu(), want)


# ------------------------------------------------------------------------------------------------
# The cupy/NVRTC path against the CUDA sources (no GPU needed)
# ------------------------------------------------------------------------------------------------


def quantize_kernel_signatures() -> dict[str, list[str]]:
    """kernel name -> parameter types, read from the __global__ definitions in quantize_kernels.cu."""
    text = QUANTIZE_CU.read_text(encoding="utf-8")
    signatures = {}
    for name, params in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\w+\)\s+)?(\w+)\s*\(([^)]*)\)", text):
        types = []
        for param in params.split(","):
            tokens = param.replace("*", " * ").split()
            types.append(" ".join(token for token in tokens[:-1] if token != "const").replace(" *", "*"))
        signatures[name] = types
    return signatures


def check_quantize_launch(launch: native_cupy.Launch, signatures: dict[str, list[str]]) -> None:
    assert launch.kernel.startswith(native_cupy.KERNEL_NAMESPACE)
    base = re.sub(r"<.*>$", "", launch.kernel[len(native_cupy.KERNEL_NAMESPACE) :])
    params = signatures[base]
    assert len(launch.args) == len(params), (launch.kernel, params)
    pointees = {"float": 4, "uint8_t": 1, "QuantizeLayer": native_cupy.QUANTIZE_LAYER.itemsize}
    for position, (arg, ctype) in enumerate(zip(launch.args, params)):
        where = f"{launch.kernel} argument {position} ({ctype})"
        if ctype.endswith("*"):
            assert isinstance(arg, torch.Tensor) and arg.is_contiguous(), where
            pointee = ctype[:-1].strip()
            if pointee == "QuantizeLayer":
                assert arg.dtype == torch.uint8 and arg.numel() % pointees[pointee] == 0, where
            else:
                assert arg.element_size() == pointees[pointee], where
        elif ctype == "int64_t":
            assert isinstance(arg, np.int64), where
        elif ctype == "float":
            assert isinstance(arg, np.float32), where
        elif ctype == "QuantizePlan":
            assert isinstance(arg, np.ndarray) and arg.dtype == native_cupy.QUANTIZE_PLAN and arg.shape == (1,), where
        else:
            raise AssertionError(f"{where}: no rule for this parameter type")
    assert launch.block == (native_cupy.QUANTIZE_THREADS, 1, 1)
    assert 1 <= launch.grid[0] <= native_cupy.QUANTIZE_MAX_GRID_BLOCKS and launch.grid[1:] == (1, 1)


def launcher_kernels(function: str) -> list[str]:
    """Kernel instantiations a C++ launcher in quantize_kernels.cu launches (textually)."""
    text = QUANTIZE_CU.read_text(encoding="utf-8")
    start = text.index(function + "(")
    body = text[start : text.index("\n}\n", start)]
    return [f"{name}<{args}>" for name, args in re.findall(r"(\w+)<([^<>]+)><<<", body)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_launch_plans_match_the_cpp_launchers(bits, stochastic):
    signatures = quantize_kernel_signatures()
    offsets, numels, chunk = [7, 0, 1007], [1000, 7, 70_001], 256
    layout = reference.quantized_message_layout(numels, bits, chunk)
    seeds = [1, -2, 2**35] if stochastic else None
    description = native_cupy.describe_quantize(offsets, layout, seeds)
    layers = torch.from_numpy(description.layers.view(np.uint8).copy())
    message = torch.zeros(layout.message_bytes, dtype=torch.uint8)
    steps = native_cupy.quantize_pack_launches(torch.zeros(71_008), layers, description, bits, stochastic, message)
    assert len(steps) == 1
    check_quantize_launch(steps[0], signatures)
    name = steps[0].kernel[len(native_cupy.KERNEL_NAMESPACE) :]
    assert name in launcher_kernels("launch_quantize_pack")
    assert name == f"quantize_pack_kernel<{bits}, {'true' if stochastic and bits in (2, 4, 8) else 'false'}>"
    assert steps[0].grid[0] == sum(-(-n // chunk) for n in numels)
    messages = torch.zeros(3 * layout.message_bytes, dtype=torch.uint8)
    unpack = native_cupy.quantize_unpack_launches(torch.zeros(71_008), messages, 3, layers, description, bits, 1 / 3)
    assert len(unpack) == 1
    check_quantize_launch(unpack[0], signatures)
    assert unpack[0].kernel[len(native_cupy.KERNEL_NAMESPACE) :] in launcher_kernels("launch_quantize_unpack_add")
    assert unpack[0].args[5] == np.float32(1 / 3)


def test_quantize_descriptors_follow_the_cpp_bookkeeping():
    offsets, numels = [10, 0, 5000], [4100, 10, 9000]
    layout = reference.quantized_message_layout(numels, 4, 1024)
    description = native_cupy.describe_quantize(offsets, layout, [5, -1, 2**32 + 7])
    assert description.layers["offset"].tolist() == offsets and description.layers["numel"].tolist() == numels
    assert description.layers["first_tile"].tolist() == [0, 5, 6]
    assert description.layers["seed"].tolist() == [5, 2**32 - 1, 7]
    assert description.layers["scale_offset"].tolist() == [s.scale_offset for s in layout.layers]
    assert description.layers["code_offset"].tolist() == [s.code_offset for s in layout.layers]
    assert description.plan.tolist() == [(3, 15, 1024, layout.message_bytes)]


def test_every_planned_quantize_kernel_is_compiled_by_name():
    planned = native_cupy.kernel_name_expressions(native_cupy.QUANTIZE_KERNEL_SOURCE)
    bases = {re.sub(r"<.*>$", "", name[len(native_cupy.KERNEL_NAMESPACE) :]) for name in planned}
    assert bases == set(quantize_kernel_signatures())
    launched = set(launcher_kernels("launch_quantize_pack") + launcher_kernels("launch_quantize_unpack_add"))
    assert {name[len(native_cupy.KERNEL_NAMESPACE) :] for name in planned} == launched


def test_quantize_constants_and_structs_match_the_sources(tmp_path):
    text = QUANTIZE_CU.read_text(encoding="utf-8")
    assert re.search(r"kQuantizeThreads = (\d+);", text).group(1) == str(native_cupy.QUANTIZE_THREADS)
    assert "kQuantizeMaxGridBlocks = int64_t(1) << 20" in text and native_cupy.QUANTIZE_MAX_GRID_BLOCKS == 1 << 20
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: cannot build the layout probe")
    probe = tmp_path / "probe.cu"
    probe.write_text(
        "#include <cstddef>\n#include <cstdio>\n#include \"gcomp/quantize_kernels.h\"\nusing namespace gcomp::cuda;\n"
        "#define F(T, f) std::printf(#T \" \" #f \" %zu %zu\\n\", offsetof(T, f), sizeof(((T*)0)->f));\n"
        "int main() { std::printf(\"QuantizeLayer size %zu\\nQuantizePlan size %zu\\n\", sizeof(QuantizeLayer), sizeof(QuantizePlan));\n"
        + "".join(f"F(QuantizeLayer, {f}) " for f in native_cupy.QUANTIZE_LAYER.names)
        + "".join(f"F(QuantizePlan, {f}) " for f in native_cupy.QUANTIZE_PLAN.names)
        + "return 0; }\n"
    )
    # Without the sanitizer preload of tests/run_asan.sh: nvcc segfaults under it.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    build = subprocess.run([nvcc, "-std=c++17", "-I", str(REPO / "csrc" / "include"), str(probe), "-o", str(tmp_path / "probe")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stderr
    output = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, check=True, env=env).stdout
    dtypes = {"QuantizeLayer": native_cupy.QUANTIZE_LAYER, "QuantizePlan": native_cupy.QUANTIZE_PLAN}
    sizes = dict(re.findall(r"^(\w+) size (\d+)$", output, re.M))
    for struct_name, dtype in dtypes.items():
        assert int(sizes[struct_name]) == dtype.itemsize
    for struct_name, field, offset, size in re.findall(r"^(\w+) (\w+) (\d+) (\d+)$", output, re.M):
        if struct_name in dtypes:
            field_dtype, field_offset = dtypes[struct_name].fields[field][:2]
            assert (int(offset), int(size)) == (field_offset, field_dtype.itemsize), f"{struct_name}.{field}"


def test_quantize_kernels_compile_with_nvrtc_as_the_runtime_path_does():
    """A real NVRTC compilation of quantize_kernels.cu (skips where no libnvrtc is installed)."""
    from test_ops_registration import CtypesNvrtc, find_nvrtc

    library = find_nvrtc()
    if library is None:
        pytest.skip("no libnvrtc found (pip install nvidia-cuda-nvrtc to run this check)")
    cccl = native_cupy.cccl_include_dirs()
    if not cccl:
        pytest.skip("no CCCL headers (libcu++) found")
    source = native_cupy.QUANTIZE_KERNEL_SOURCE
    ptx, kind, lowered = native_cupy.compile_kernels(CtypesNvrtc(library), 90, native_cupy.kernel_root(), cccl, source)
    text = ptx.decode(errors="replace")
    assert kind == "ptx" and ".ftz" not in text and "fma.rn.f32" not in text
    assert set(lowered) == set(native_cupy.kernel_name_expressions(source))


def test_quantize_device_only_compilation_has_no_host_constructs(tmp_path):
    """What NVRTC sees (``__CUDACC_RTC__``): no launches, runtime API, C++ standard headers or std::."""
    import shutil
    import subprocess

    cpp = shutil.which("g++") or shutil.which("cpp")
    if cpp is None:
        pytest.skip("no C preprocessor")
    stubs = tmp_path / "stubs"
    for header in ("cuda/std/cstdint", "cuda/std/cstring"):
        (stubs / header).parent.mkdir(parents=True, exist_ok=True)
        (stubs / header).write_text("")
    command = [cpp, "-E", "-P", "-x", "c++", "-nostdinc", "-D__CUDACC__", "-D__CUDACC_RTC__", "-D__CUDA_ARCH__=900",
               "-I", str(REPO / "csrc" / "include"), "-I", str(stubs), str(QUANTIZE_CU)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    code = result.stdout
    for construct in ("<<<", "cudaGetLastError", "cudaStream_t", "cudaError_t", "std::rint", "std::floor", "std::fabs"):
        assert construct not in code, construct
    assert "namespace rtc {" in code
