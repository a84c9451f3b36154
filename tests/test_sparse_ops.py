"""The sparse top-k message ops: format, selection rule, native == reference, malformed input.

The pure-torch reference (``gcomp.compress.sparse``) defines the format; the native kernels
(``torch.ops.gcomp.*`` from ``gcomp._C``) must match it byte for byte and sum for sum. Tests that
need the native kernels skip, saying why, when the extension is not built.
"""
from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcomp import ops
from gcomp.compress import sparse as reference

NATIVE_MISSING_REASON = (
    "gcomp._C is not built (pip install --no-build-isolation --use-pep517 -e .) or GCOMP_NATIVE=0"
)
requires_native = pytest.mark.skipif(not ops.native_available(), reason=NATIVE_MISSING_REASON)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

def hypothesis_settings(max_examples: int) -> settings:
    return settings(
        deadline=None,
        max_examples=max_examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )



@dataclass(frozen=True)
class Codec:
    """One implementation of the three ops, so every test can run against both."""

    name: str
    topk_pack: Callable
    sparse_unpack_add_: Callable
    sparse_unpack: Callable


REFERENCE = Codec("reference", reference.topk_pack, reference.sparse_unpack_add_, reference.sparse_unpack)


def native_codec() -> Codec:
    return Codec(
        "native",
        lambda buffer, offsets, numels, ks, value_dtype: torch.ops.gcomp.topk_pack(
            buffer, list(offsets), list(numels), list(ks), value_dtype
        ),
        lambda out, messages, offsets, numels, ks, value_dtype, scale=1.0: torch.ops.gcomp.sparse_unpack_add_(
            out, messages, list(offsets), list(numels), list(ks), value_dtype, float(scale)
        ),
        lambda messages, offsets, numels, ks, value_dtype: torch.ops.gcomp.sparse_unpack(
            messages, list(offsets), list(numels), list(ks), value_dtype
        ),
    )


@pytest.fixture(params=["reference", "native"])
def codec(request) -> Codec:
    if request.param == "reference":
        return REFERENCE
    if not ops.native_available():
        pytest.skip(NATIVE_MISSING_REASON)
    return native_codec()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN when the payloads agree, -0.0 != +0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def brute_force_topk(x: torch.Tensor, k: int) -> list[int]:
    """The selection rule written out: sort by (|x| descending, NaN first, index ascending)."""
    values = x.double().tolist()

    def rank(i: int) -> tuple[float, int]:
        magnitude = math.inf if math.isnan(values[i]) else abs(values[i])
        nan_first = 0 if math.isnan(values[i]) else 1
        return (nan_first, -magnitude, i)

    return sorted(sorted(range(len(values)), key=rank)[:k])


def dense_topk(buffer: torch.Tensor, offsets, numels, ks, value_dtype, out_dtype) -> torch.Tensor:
    """What unpacking one message into zeros must give, built from brute-force selection."""
    expected = torch.zeros(buffer.numel(), dtype=out_dtype)
    for offset, numel, k in zip(offsets, numels, ks):
        layer = buffer[offset : offset + numel]
        chosen = torch.tensor(brute_force_topk(layer, k), dtype=torch.int64)
        values = layer[chosen]
        if values.dtype == torch.float64 and value_dtype != torch.float32:
            values = values.float()
        expected[offset + chosen] = values.to(value_dtype).to(out_dtype)
    return expected


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------


def test_index_bits_is_ceil_log2_at_least_one():
    cases = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 1 << 20: 20, (1 << 20) + 1: 21, 1 << 56: 56}
    assert {numel: reference.index_bits(numel) for numel in cases} == cases


def test_layout_by_hand():
    layout = reference.sparse_message_layout([10, 1000], [3, 500], torch.float16)
    small, large = layout.layers
    # 3 indices x 4 bits = 2 bytes vs a 2-byte bitmap: equal once padded -> bit-packed (tie rule)
    assert (small.bits, small.bitmap, small.value_offset, small.value_bytes) == (4, False, 0, 8)
    assert (small.index_offset, small.index_payload_bytes, small.index_bytes) == (8, 2, 8)
    # 500 x 10 bits = 625 bytes vs a 125-byte bitmap -> bitmap
    assert (large.bits, large.bitmap, large.value_offset, large.value_bytes) == (10, True, 16, 1000)
    assert (large.index_offset, large.index_payload_bytes, large.index_bytes) == (1016, 125, 128)
    assert layout.message_bytes == 1144
    assert layout.total_entries == 503


def test_layout_sections_are_aligned_and_contiguous():
    numels = [1, 7, 64, 1000, 4097, 100_000]
    ks = [1, 3, 64, 999, 5, 30_000]
    for value_dtype in VALUE_DTYPES:
        layout = reference.sparse_message_layout(numels, ks, value_dtype)
        cursor = 0
        for section in layout.layers:
            assert section.value_offset == cursor
            assert section.value_offset % 8 == 0 and section.index_offset % 8 == 0
            assert section.index_offset == section.value_offset + section.value_bytes
            cursor = section.end
        assert layout.message_bytes == cursor


@pytest.mark.parametrize("numels, ks", [([10], [0]), ([10], [11]), ([0], [1]), ([5, 5], [1])])
def test_layout_rejects_bad_k(numels, ks):
    with pytest.raises(ValueError):
        reference.sparse_message_layout(numels, ks, torch.float32)


# ------------------------------------------------------------------------------------------------
# Selection rule and round trip
# ------------------------------------------------------------------------------------------------


def test_selection_rule_ties_and_nan(codec):
    x = torch.tensor([1.0, -3.0, 3.0, float("nan"), 0.0, -0.0, 3.0, float("-inf"), 2.0, float("nan")])
    expected_order = [3, 9, 7, 1, 2, 6, 8, 0, 4, 5]  # NaNs, -inf, then |3| by index, ...
    for k in range(1, x.numel() + 1):
        message = codec.topk_pack(x, [0], [x.numel()], [k], torch.float32)
        values, indices = codec.sparse_unpack(message, [0], [x.numel()], [k], torch.float32)
        assert indices.tolist() == sorted(expected_order[:k])
        assert same_bits(values, x[indices])


def test_selection_matches_brute_force_with_many_ties(codec):
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        numel = int(torch.randint(1, 300, (1,), generator=generator))
        x = torch.randint(-3, 4, (numel,), generator=generator).float()
        k = int(torch.randint(1, numel + 1, (1,), generator=generator))
        message = codec.topk_pack(x, [0], [numel], [k], torch.float32)
        _, indices = codec.sparse_unpack(message, [0], [numel], [k], torch.float32)
        assert indices.tolist() == brute_force_topk(x, k), trial


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("buffer_dtype", FLOAT_DTYPES)
def test_round_trip_places_topk_at_offsets(codec, buffer_dtype, value_dtype):
    generator = torch.Generator().manual_seed(2)
    buffer = torch.randn(6000, generator=generator).to(buffer_dtype)
    # layer 0: 0.5 % -> bit-packed; layer 1: 40 % -> bitmap; layer 2: everything; a gap before 3
    offsets, numels, ks = [0, 2000, 3000, 4100], [2000, 1000, 100, 1900], [10, 400, 100, 1]
    layout = reference.sparse_message_layout(numels, ks, value_dtype)
    assert [s.bitmap for s in layout.layers] == [False, True, True, False]
    message = codec.topk_pack(buffer, offsets, numels, ks, value_dtype)
    assert message.dtype == torch.uint8 and message.numel() == layout.message_bytes
    out = torch.zeros(6000, dtype=torch.float64)
    codec.sparse_unpack_add_(out, message, offsets, numels, ks, value_dtype, 1.0)
    assert same_bits(out, dense_topk(buffer, offsets, numels, ks, value_dtype, torch.float64))


def test_unpack_adds_messages_in_order_with_scale(codec):
    generator = torch.Generator().manual_seed(3)
    offsets, numels, ks = [0, 500], [500, 700], [50, 300]
    buffers = [torch.randn(1200, generator=generator) for _ in range(3)]
    messages = torch.stack([codec.topk_pack(b, offsets, numels, ks, torch.float32) for b in buffers])
    out = torch.randn(1200, generator=generator)
    expected = out.clone()
    for b in buffers:
        expected = expected + torch.tensor(0.25) * dense_topk(b, offsets, numels, ks, torch.float32, torch.float32)
    codec.sparse_unpack_add_(out, messages, offsets, numels, ks, torch.float32, 0.25)
    assert same_bits(out, expected)


def test_half_output_rounds_after_every_message(codec):
    offsets, numels, ks = [0], [4], [4]
    message = codec.topk_pack(torch.tensor([1e-3, 1.0, -2.0, 3.0]), offsets, numels, ks, torch.float32)
    messages = torch.stack([message, message])
    out = torch.tensor([2048.0, 0.5, 0.0, 1.0], dtype=torch.float16)
    expected = out.clone()
    for _ in range(2):
        update = torch.tensor([1e-3, 1.0, -2.0, 3.0]) * torch.tensor(0.5)
        expected = (expected.float() + update).half()
    codec.sparse_unpack_add_(out, messages, offsets, numels, ks, torch.float32, 0.5)
    assert same_bits(out, expected)
    assert out[0] == 2048.0  # 2048 + 5e-4 rounds back to 2048 in float16, twice


def test_conversion_edge_values_match_torch(codec):
    specials = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25,
                1.5 * 2.0**-25, 2.0**-14, 6.0e-5, 3.0e38, float("inf"), float("-inf"), 1e-40, -1e-45]
    x = torch.tensor(specials, dtype=torch.float32)
    for value_dtype in VALUE_DTYPES:
        message = codec.topk_pack(x, [0], [x.numel()], [x.numel()], value_dtype)
        values, indices = codec.sparse_unpack(message, [0], [x.numel()], [x.numel()], value_dtype)
        assert same_bits(values, x.to(value_dtype)), value_dtype


# ------------------------------------------------------------------------------------------------
# Native == reference, bit for bit
# ------------------------------------------------------------------------------------------------


@st.composite
def buckets(draw, allow_large: bool = True):
    """Random layers (with gaps, in any order), densities, dtypes and data distributions."""
    n_layers = draw(st.integers(1, 4))
    numels, ks = [], []
    for _ in range(n_layers):
        if allow_large and draw(st.integers(0, 5)) == 0:
            numel = draw(st.integers(33_000, 140_000))  # several chunks; sampled bracket
        else:
            numel = draw(st.integers(1, 3000))
        density = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.3, 0.7, 1.0]))
        numels.append(numel)
        ks.append(min(numel, max(1, round(density * numel))))
    gaps = draw(st.lists(st.integers(0, 9), min_size=n_layers, max_size=n_layers))
    order = draw(st.permutations(range(n_layers)))
    offsets = [0] * n_layers
    cursor = 0
    for layer in order:
        cursor += gaps[layer]
        offsets[layer] = cursor
        cursor += numels[layer]
    total = cursor + draw(st.integers(0, 9))
    kind = draw(st.sampled_from(["normal", "ties", "sparse", "wide", "nan"]))
    seed = draw(st.integers(0, 2**31 - 1))
    buffer_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    value_dtype = draw(st.sampled_from(VALUE_DTYPES))
    return offsets, numels, ks, total, kind, seed, buffer_dtype, value_dtype


def make_buffer(total: int, kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(total, generator=generator)
    elif kind == "ties":
        x = torch.randint(-4, 5, (total,), generator=generator).float()
    elif kind == "sparse":  # mostly exact zeros, with +-0 and infinities
        x = torch.randn(total, generator=generator) * (torch.rand(total, generator=generator) < 0.05)
        x[torch.rand(total, generator=generator) < 0.01] = -0.0
        x[torch.rand(total, generator=generator) < 0.002] = float("inf")
    elif kind == "wide":  # magnitudes over many binades, including float16 overflow and subnormals
        x = torch.randn(total, generator=generator) * torch.exp2(torch.randint(-30, 30, (total,), generator=generator).float())
    else:  # NaNs of both signs with assorted payloads (quiet and signalling) among normal values
        x = torch.randn(total, generator=generator).to(dtype)
        bits = x.view(torch.int16 if dtype in (torch.float16, torch.bfloat16) else torch.int32 if dtype == torch.float32 else torch.int64)
        nan_bits = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000, torch.float64: 0x7FF0000000000000}[dtype]
        chosen = torch.rand(total, generator=generator) < 0.03
        payload = torch.randint(1, 64, (total,), generator=generator).to(bits.dtype)
        sign = (torch.rand(total, generator=generator) < 0.5).to(bits.dtype)
        bits[chosen] = (torch.tensor(nan_bits).to(bits.dtype) | payload | (sign << (bits.element_size() * 8 - 1)))[chosen]
        return x
    return x.to(dtype)


SIMD_LEVELS = ["avx512", "avx2", "portable"]


def supported_simd_levels() -> list[str]:
    """The levels the native pack can run on this CPU (none without the extension)."""
    if not ops.native_available():
        return []
    import gcomp._C

    return list(gcomp._C.supported_simd_levels())


def simd_level_params(levels=SIMD_LEVELS) -> list:
    """One pytest param per level; levels this CPU (or build) cannot run skip, saying why."""
    supported = supported_simd_levels()
    params = []
    for level in levels:
        if not ops.native_available():
            reason = NATIVE_MISSING_REASON
        else:
            reason = f"this CPU lacks the instructions of the {level} level (it runs: {', '.join(supported)})"
        params.append(pytest.param(level, id=level, marks=pytest.mark.skipif(level not in supported, reason=reason)))
    return params


@contextmanager
def forced_simd(level: str):
    """GCOMP_SIMD=<level> makes the native kernels take that level's code path."""
    previous = os.environ.get("GCOMP_SIMD")
    os.environ["GCOMP_SIMD"] = level
    try:
        yield
    finally:
        if previous is None:
            del os.environ["GCOMP_SIMD"]
        else:
            os.environ["GCOMP_SIMD"] = previous


@requires_native
@pytest.mark.parametrize("level", simd_level_params())
@hypothesis_settings(max_examples=60)
@given(bucket=buckets(), n_messages=st.integers(1, 3), out_dtype=st.sampled_from(FLOAT_DTYPES),
       scale=st.sampled_from([1.0, -1.0, 0.5, 1 / 3, 1e-3]))
def test_native_matches_reference_bitwise(level, bucket, n_messages, out_dtype, scale):
    offsets, numels, ks, total, kind, seed, buffer_dtype, value_dtype = bucket
    native = native_codec()
    messages = []
    for m in range(n_messages):
        buffer = make_buffer(total, kind, seed + m, buffer_dtype)
        with forced_simd(level):
            packed_native = native.topk_pack(buffer, offsets, numels, ks, value_dtype)
        packed_reference = reference.topk_pack(buffer, offsets, numels, ks, value_dtype)
        assert torch.equal(packed_native, packed_reference)
        messages.append(packed_native)
    stacked = torch.stack(messages)
    out_native = make_buffer(total, "normal", seed ^ 0x5EED, out_dtype)
    out_reference = out_native.clone()
    with forced_simd(level):
        native.sparse_unpack_add_(out_native, stacked, offsets, numels, ks, value_dtype, scale)
    reference.sparse_unpack_add_(out_reference, stacked, offsets, numels, ks, value_dtype, scale)
    assert same_bits(out_native, out_reference)
    for decoded_native, decoded_reference in zip(
        native.sparse_unpack(stacked, offsets, numels, ks, value_dtype),
        reference.sparse_unpack(stacked, offsets, numels, ks, value_dtype),
    ):
        assert same_bits(decoded_native, decoded_reference)


@requires_native
@pytest.mark.parametrize("numel, threads", [(1 << 17, 1), (1 << 18, 2)], ids=["one-thread", "two-threads"])
@pytest.mark.parametrize("level", simd_level_params())
@pytest.mark.parametrize("trap", ["sample_sees_small", "sample_sees_large"])
def test_native_exact_when_the_sample_misleads(trap, level, numel, threads):
    # Large layers are sampled in runs of 16 at a stride that is a multiple of 1024; put the large
    # values only outside (or only inside) those runs so the bracket from the sample is wrong. On
    # two threads the rescan, the threshold and the write-out meet chunks another thread scanned.
    position_in_run = torch.arange(numel) % 1024
    sampled = position_in_run < 16
    large = ~sampled if trap == "sample_sees_small" else sampled
    x = torch.where(large, 100.0 + torch.arange(numel) % 7, torch.arange(numel) % 5 * 0.01)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for k in [1, 100, 5000, 60000, numel // 2]:
            for value_dtype in (torch.float32, torch.float16):
                with forced_simd(level):
                    native = torch.ops.gcomp.topk_pack(x, [0], [numel], [k], value_dtype)
                assert torch.equal(native, reference.topk_pack(x, [0], [numel], [k], value_dtype)), (k, value_dtype)
    finally:
        torch.set_num_threads(before)


@requires_native
@pytest.mark.parametrize("level", simd_level_params())
def test_native_levels_on_large_float32_layers(level):
    """The float32 fast paths of every level (sparse and dense candidate scans, bitmap and
    index-list write-out, ties split across chunks) on layers of several 64K-element chunks."""
    generator = torch.Generator().manual_seed(7)
    numels = [70_000, 300_001, 131_072]
    x = torch.cat([torch.randn(numels[0], generator=generator),
                   torch.randint(-4, 5, (numels[1],), generator=generator).float(),
                   torch.randn(numels[2], generator=generator)])
    offsets = [0, numels[0], numels[0] + numels[1]]
    for density in (0.001, 0.01, 0.04, 0.1, 0.5):
        ks = [max(1, round(density * numel)) for numel in numels]
        for value_dtype in (torch.float32, torch.bfloat16):
            with forced_simd(level):
                native = torch.ops.gcomp.topk_pack(x, offsets, numels, ks, value_dtype)
            assert torch.equal(native, reference.topk_pack(x, offsets, numels, ks, value_dtype)), (density, value_dtype)


@functools.lru_cache(maxsize=None)
def dense_bitmap_case():
    """Messages and the twin's sums for test_native_unpack_levels_on_dense_bitmaps (shared by
    its levels: the twin's packing is the slow part)."""
    numels = [70_001, 65_536]
    offsets = [3, 3 + numels[0]]
    ks = [21_000, 30_000]
    total = offsets[1] + numels[1] + 5
    messages = []
    for m in range(9):
        x = make_buffer(total, "nan" if m % 3 == 0 else "wide", 100 + m, torch.float32)
        x[m * 7 : m * 7 + 3] = float("inf") if m % 2 else -float("inf")
        messages.append(reference.topk_pack(x, offsets, numels, ks, torch.float32))
    stacked = torch.stack(messages)
    out = make_buffer(total, "nan", 5, torch.float32)
    expected = {}
    for scale in (1.0, -0.3):
        expected[scale] = out.clone()
        reference.sparse_unpack_add_(expected[scale], stacked, offsets, numels, ks, torch.float32, scale)
    return offsets, numels, ks, stacked, out, expected


@requires_native
@pytest.mark.parametrize("level", simd_level_params())
def test_native_unpack_levels_on_dense_bitmaps(level):
    """The vector add of bitmap layers (float32 into float32): more messages than one batch (8),
    a layer ending inside a word, NaN and infinite entries, and NaN payloads in the output that
    no entry touches (which must keep their bits) or that an entry turns canonical."""
    offsets, numels, ks, stacked, out, expected = dense_bitmap_case()
    for scale, want in expected.items():
        actual = out.clone()
        with forced_simd(level):
            torch.ops.gcomp.sparse_unpack_add_(actual, stacked, offsets, numels, ks, torch.float32, scale)
        assert same_bits(actual, want)


@requires_native
def test_simd_switch_reports_and_refuses():
    """GCOMP_SIMD picks the level that runs (reported by simd_level()); a misspelt level, or one
    this CPU lacks, raises instead of quietly running (and being measured as) another path."""
    import gcomp._C

    supported = supported_simd_levels()
    assert supported[-1] == "portable" and set(supported) <= set(SIMD_LEVELS)
    x = torch.randn(5000)
    for level in supported:
        with forced_simd(level):
            assert gcomp._C.simd_level() == level
            assert ops.simd_level() == level
    with forced_simd("auto"):
        assert gcomp._C.simd_level() == supported[0]
    with forced_simd("avx9000"):
        with pytest.raises(ValueError, match="GCOMP_SIMD must be"):
            torch.ops.gcomp.topk_pack(x, [0], [5000], [50], torch.float32)
    for level in set(SIMD_LEVELS) - set(supported):
        with forced_simd(level):
            with pytest.raises(ValueError, match="lacks the instructions"):
                torch.ops.gcomp.topk_pack(x, [0], [5000], [50], torch.float32)


@requires_native
def test_native_result_does_not_depend_on_thread_count():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(300_000, generator=generator)
    offsets, numels, ks = [0, 200_000], [200_000, 100_000], [30_000, 200]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            message = torch.ops.gcomp.topk_pack(x, offsets, numels, ks, torch.float16)
            out = torch.ones(300_000)
            torch.ops.gcomp.sparse_unpack_add_(out, torch.stack([message] * 3), offsets, numels, ks, torch.float16, 0.3)
            results.append((message, out))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])


@requires_native
def test_native_ops_trace_with_fake_tensors():
    x = torch.randn(4000)
    offsets, numels, ks = [0, 1000], [1000, 3000], [10, 1500]
    message = torch.ops.gcomp.topk_pack(x, offsets, numels, ks, torch.bfloat16)
    torch.library.opcheck(torch.ops.gcomp.topk_pack.default, (x, offsets, numels, ks, torch.bfloat16))
    torch.library.opcheck(
        torch.ops.gcomp.sparse_unpack_add_.default,
        (torch.zeros(4000), torch.stack([message, message]), offsets, numels, ks, torch.bfloat16, 0.5),
    )
    torch.library.opcheck(torch.ops.gcomp.sparse_unpack.default, (message, offsets, numels, ks, torch.bfloat16))


def test_ops_dispatch_honours_disable_switch(monkeypatch):
    x = torch.randn(3000)
    args = ([0, 1000], [1000, 2000], [10, 900], torch.float16)
    monkeypatch.setenv(ops.NATIVE_ENV, "0")
    assert not ops.native_available()
    message = ops.topk_pack(x, *args)
    out = torch.zeros(3000)
    ops.sparse_unpack_add_(out, message, *args, scale=2.0)
    monkeypatch.delenv(ops.NATIVE_ENV)
    if ops.native_available():
        assert torch.equal(message, ops.topk_pack(x, *args))
        out_native = torch.zeros(3000)
        ops.sparse_unpack_add_(out_native, message, *args, scale=2.0)
        assert same_bits(out, out_native)
    values, indices = ops.sparse_unpack(message, *args)
    assert same_bits(out[indices], values.float() * 2.0)


# ------------------------------------------------------------------------------------------------
# Malformed input: both paths raise ValueError and never write outside (or at all into) `out`
# ------------------------------------------------------------------------------------------------

GUARD = 16
SENTINEL = 12345.0


def guarded_out(numel: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole, view): `view` is the caller's out; `whole` adds guard regions on both sides."""
    whole = torch.full((numel + 2 * GUARD,), SENTINEL, dtype=dtype)
    return whole, whole[GUARD : GUARD + numel]


def assert_rejected_untouched(codec: Codec, messages, offsets, numels, ks, value_dtype, numel=2000):
    whole, out = guarded_out(numel)
    before = whole.clone()
    with pytest.raises(ValueError):
        codec.sparse_unpack_add_(out, messages, offsets, numels, ks, value_dtype, 1.0)
    assert same_bits(whole, before)


@pytest.fixture
def valid_bucket():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2000, generator=generator)
    offsets, numels, ks = [0, 1000], [1000, 1000], [20, 400]  # bit-packed, bitmap
    layout = reference.sparse_message_layout(numels, ks, torch.float32)
    return x, offsets, numels, ks, layout, reference.topk_pack(x, offsets, numels, ks, torch.float32)


def test_malformed_sizes_and_types_raise(codec, valid_bucket):
    _, offsets, numels, ks, _, message = valid_bucket
    bad_messages = [
        message[:-8],  # truncated
        torch.cat([message, message[:8]]),  # too long
        message.view(torch.int8),  # not uint8
        message.float(),
        message.view(1, 1, -1),  # 3-D
        torch.stack([message, message])[:, :-1],  # rows of the wrong size
    ]
    for bad in bad_messages:
        assert_rejected_untouched(codec, bad, offsets, numels, ks, torch.float32)
    assert_rejected_untouched(codec, message, offsets, numels, ks, torch.float16)  # wrong value dtype
    assert_rejected_untouched(codec, message, offsets, numels, [21, 400], torch.float32)  # other ks


def test_bad_layer_descriptions_raise(codec, valid_bucket):
    x, offsets, numels, ks, _, message = valid_bucket
    bad_layers = [
        ([0, 1001], numels, ks),  # beyond out
        ([-1, 1000], numels, ks),  # negative offset
        ([0, 500], numels, ks),  # overlapping layers
        (offsets, numels, [0, 400]),  # k = 0
        (offsets, numels, [1001, 400]),  # k > numel
        (offsets, [1000], [20]),  # lists of different lengths
        (offsets, [0, 1000], ks),  # empty layer
    ]
    for bad_offsets, bad_numels, bad_ks in bad_layers:
        assert_rejected_untouched(codec, message, bad_offsets, bad_numels, bad_ks, torch.float32)
        if bad_offsets != [0, 500]:  # overlap is harmless (and allowed) when packing
            with pytest.raises(ValueError):
                codec.topk_pack(x, bad_offsets, bad_numels, bad_ks, torch.float32)


def test_bad_tensors_raise(codec, valid_bucket):
    x, offsets, numels, ks, _, message = valid_bucket
    with pytest.raises(ValueError):
        codec.topk_pack(x.view(2, 1000), [0], [1000], [5], torch.float32)  # not 1-D
    with pytest.raises(ValueError):
        codec.topk_pack(x[::2], [0], [1000], [5], torch.float32)  # not contiguous
    with pytest.raises(ValueError):
        codec.topk_pack(x.int(), offsets, numels, ks, torch.float32)  # not floating
    with pytest.raises(ValueError):
        codec.topk_pack(x, offsets, numels, ks, torch.float64)  # no float64 values on the wire
    for bad_out in [torch.zeros(2000, dtype=torch.int32), torch.zeros(4000)[::2]]:
        with pytest.raises(ValueError):
            codec.sparse_unpack_add_(bad_out, message, offsets, numels, ks, torch.float32, 1.0)


def corrupt(message: torch.Tensor, start: int, stop: int, fill: int) -> torch.Tensor:
    bad = message.clone()
    bad[start:stop] = fill
    return bad


def test_corrupted_bitpacked_indices_raise(codec, valid_bucket):
    _, offsets, numels, ks, layout, message = valid_bucket
    section = layout.layers[0]
    assert not section.bitmap
    payload = slice(section.index_offset, section.index_offset + section.index_payload_bytes)
    for fill in (0x00, 0xFF):  # all-equal indices: not increasing (0xFF: also >= numel)
        assert_rejected_untouched(codec, corrupt(message, payload.start, payload.stop, fill), offsets, numels, ks, torch.float32)
    # a single index beyond numel, in an otherwise increasing list: 10 bits, numel 1000
    bad = message.clone()
    indices = list(range(0, 19 * 50, 50)) + [1023]
    bad[payload] = reference.pack_indices(torch.tensor(indices), section.bits)
    assert_rejected_untouched(codec, bad, offsets, numels, ks, torch.float32)
    # a repeated index
    bad[payload] = reference.pack_indices(torch.tensor(list(range(19)) + [18]), section.bits)
    assert_rejected_untouched(codec, bad, offsets, numels, ks, torch.float32)


def test_corrupted_bitmaps_raise(codec, valid_bucket):
    _, offsets, numels, ks, layout, message = valid_bucket
    section = layout.layers[1]
    assert section.bitmap
    start = section.index_offset
    bitmap = message[start : start + section.index_payload_bytes]
    first_set = int(torch.nonzero(bitmap).flatten()[0])
    first_clear = int(torch.nonzero(bitmap != 0xFF).flatten()[0])
    missing_bit = message.clone()
    missing_bit[start + first_set] &= missing_bit[start + first_set] - 1  # clear one bit
    extra_bit = message.clone()
    extra_bit[start + first_clear] |= ~extra_bit[start + first_clear] & (extra_bit[start + first_clear] + 1)
    for bad in (missing_bit, extra_bit, corrupt(message, start, start + section.index_payload_bytes, 0)):
        assert_rejected_untouched(codec, bad, offsets, numels, ks, torch.float32)


def test_bitmap_bit_beyond_numel_raises(codec):
    x = torch.randn(1001)
    layout = reference.sparse_message_layout([1001], [500], torch.float32)
    assert layout.layers[0].bitmap
    message = reference.topk_pack(x, [0], [1001], [500], torch.float32)
    last_byte = layout.layers[0].index_offset + layout.layers[0].index_payload_bytes - 1
    # move one selected bit to position 1001 (beyond numel) keeping the popcount at k
    bad = message.clone()
    first_set_byte = int(torch.nonzero(message[layout.layers[0].index_offset :]).flatten()[0])
    byte = layout.layers[0].index_offset + first_set_byte
    bad[byte] &= bad[byte] - 1
    bad[last_byte] |= 0b10
    assert_rejected_untouched(codec, bad, [0], [1001], [500], torch.float32, numel=1001)


@hypothesis_settings(max_examples=200)
@given(seed=st.integers(0, 2**31 - 1), n_flips=st.integers(1, 6), random_bytes=st.booleans())
def test_fuzzed_messages_raise_or_agree_and_stay_in_bounds(seed, n_flips, random_bytes):
    generator = torch.Generator().manual_seed(seed)
    offsets, numels, ks = [3, 40, 300], [30, 250, 1000], [29, 7, 600]
    numel = 1400
    layout = reference.sparse_message_layout(numels, ks, torch.float16)
    if random_bytes:
        message = torch.randint(0, 256, (layout.message_bytes,), dtype=torch.uint8, generator=generator)
    else:
        x = torch.randn(numel, generator=generator)
        message = reference.topk_pack(x, offsets, numels, ks, torch.float16)
        positions = torch.randint(0, layout.message_bytes, (n_flips,), generator=generator)
        message[positions] ^= torch.randint(1, 256, (n_flips,), dtype=torch.uint8, generator=generator)
    codecs = [REFERENCE] + ([native_codec()] if ops.native_available() else [])
    outcomes = []
    for codec in codecs:
        whole, out = guarded_out(numel)
        try:
            codec.sparse_unpack_add_(out, message, offsets, numels, ks, torch.float16, 1.0)
            outcomes.append(whole)
        except ValueError:
            assert torch.all(whole == SENTINEL)
            outcomes.append(None)
        assert torch.all(whole[:GUARD] == SENTINEL) and torch.all(whole[-GUARD:] == SENTINEL)
    if len(outcomes) == 2:
        assert (outcomes[0] is None) == (outcomes[1] is None)
        if outcomes[0] is not None:
            assert same_bits(outcomes[0], outcomes[1])
