// The sparse message format of gcomp, element by element.
//
// Everything that decides a byte of a packed top-k message lives here, so the CPU kernels
// (sparse_ops.cpp), the CUDA kernels (sparse_kernels.cu) and, by mirroring, the pure-torch
// reference (gcomp/compress/sparse.py) cannot drift apart. The header depends on nothing but
// <cstdint>/<cstring> so that plain nvcc and plain g++ both compile it.
//
// Message of one bucket = for each layer, in order:
//   values  : k values in the value dtype, ordered by ascending index, padded to 8 bytes
//   indices : bit-packed at bits = max(1, ceil(log2 numel)) per index (ascending, LSB first), or
//             a bitmap of numel bits (bit i <=> index i), whichever padded size is smaller;
//             ties go to bit-packing. Padded to 8 bytes.
// Padding bytes are written as zero and ignored when reading.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC (the run-time compiler behind the cupy fallback) ships no C++ standard library; libcu++
// from CCCL supplies the same fixed-width integers and memcpy.
#include <cuda/std/cstdint>
#include <cuda/std/cstring>
namespace std {
using ::cuda::std::memcpy;
}  // namespace std
#else
#include <cstdint>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define GCOMP_HD __host__ __device__
#else
#define GCOMP_HD
#endif

namespace gcomp {
namespace format {

// ---------------------------------------------------------------------------------------------
// Value dtypes
// ---------------------------------------------------------------------------------------------

// Runtime tag of the floating types a message or a buffer may hold. Kept independent of torch's
// ScalarType so the raw CUDA kernels need no torch header.
enum class FloatKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

GCOMP_HD inline int64_t float_kind_size(FloatKind kind) {
  return kind == FloatKind::kFloat64 ? 8 : (kind == FloatKind::kFloat32 ? 4 : 2);
}

// Raw 16-bit storage of IEEE half and bfloat16. Distinct types (not bare uint16_t) so overloads
// pick the right key and conversion at compile time.
struct Half16 {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

// ---------------------------------------------------------------------------------------------
// Bit casts and exactly-rounded arithmetic
// ---------------------------------------------------------------------------------------------

GCOMP_HD inline uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

GCOMP_HD inline uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

GCOMP_HD inline float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Multiplication and addition that are never fused into an FMA: the unpack result must be the
// same bits on every rank, every device and in the pure-torch reference (which rounds twice).
GCOMP_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GCOMP_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GCOMP_HD inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GCOMP_HD inline double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------
// Finite values and infinities round to nearest even, exactly like torch's .to(). NaNs follow one
// fixed rule, because torch's own NaN bits differ between its scalar and vector code paths:
// widening to float keeps sign and payload and sets the quiet bit; narrowing to float16 or
// bfloat16 gives the quiet NaN of the same sign (0x7E00 / 0x7FC0 | sign).

GCOMP_HD inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) {  // inf, or NaN (payload kept, quieted)
    return float_from_bits(sign | 0x7F800000u | (mantissa << 13) | (mantissa != 0 ? 0x400000u : 0u));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24 is exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return float_from_bits(sign | bits_of(magnitude));
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

GCOMP_HD inline uint16_t float_to_half_bits(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65536: inf
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (a <= 0x33000000u) return sign;  // <= 2^-25 rounds (ties to even) to zero
    const uint32_t exponent = a >> 23;  // 102 .. 112
    const uint32_t mantissa = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 .. 24
    uint32_t result = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  // normal range; a carry out of the mantissa correctly bumps the exponent (up to inf)
  uint32_t result = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3FFu);
  const uint32_t remainder = a & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}

GCOMP_HD inline float bfloat16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  return float_from_bits((u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x400000u) : u);
}

GCOMP_HD inline uint16_t float_to_bfloat16_bits(float x) {
  const uint32_t u = bits_of(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7FC0u);  // NaN
  }
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// Any supported input element as float. Doubles are rounded once here; 16-bit values convert
// exactly. A double therefore reaches a 16-bit value dtype through float32 (two roundings), which
// the reference reproduces with x.to(float32).to(value_dtype).
GCOMP_HD inline float to_float(float x) { return x; }
GCOMP_HD inline float to_float(double x) { return static_cast<float>(x); }
GCOMP_HD inline float to_float(Half16 x) { return half_bits_to_float(x.bits); }
GCOMP_HD inline float to_float(BFloat16Bits x) { return bfloat16_bits_to_float(x.bits); }

// Writes one input element into a message as the value dtype. Same-type copies keep the exact
// bits (NaN payloads included); other pairs convert through float.
template <class In>
GCOMP_HD inline void store_value(uint8_t* dst, FloatKind value_kind, In x) {
  if (value_kind == FloatKind::kFloat32) {
    const float f = to_float(x);
    std::memcpy(dst, &f, sizeof(f));
  } else if (value_kind == FloatKind::kFloat16) {
    const uint16_t h = float_to_half_bits(to_float(x));
    std::memcpy(dst, &h, sizeof(h));
  } else {
    const uint16_t b = float_to_bfloat16_bits(to_float(x));
    std::memcpy(dst, &b, sizeof(b));
  }
}
template <>
GCOMP_HD inline void store_value<Half16>(uint8_t* dst, FloatKind value_kind, Half16 x) {
  if (value_kind == FloatKind::kFloat16) {
    std::memcpy(dst, &x.bits, sizeof(x.bits));
  } else if (value_kind == FloatKind::kFloat32) {
    const float f = half_bits_to_float(x.bits);
    std::memcpy(dst, &f, sizeof(f));
  } else {
    const uint16_t b = float_to_bfloat16_bits(half_bits_to_float(x.bits));
    std::memcpy(dst, &b, sizeof(b));
  }
}
template <>
GCOMP_HD inline void store_value<BFloat16Bits>(uint8_t* dst, FloatKind value_kind, BFloat16Bits x) {
  if (value_kind == FloatKind::kBFloat16) {
    std::memcpy(dst, &x.bits, sizeof(x.bits));
  } else if (value_kind == FloatKind::kFloat32) {
    const float f = bfloat16_bits_to_float(x.bits);
    std::memcpy(dst, &f, sizeof(f));
  } else {
    const uint16_t h = float_to_half_bits(bfloat16_bits_to_float(x.bits));
    std::memcpy(dst, &h, sizeof(h));
  }
}

// Reads value j of a value section as float (exact for every value dtype).
GCOMP_HD inline float load_value(const uint8_t* values, FloatKind value_kind, int64_t j) {
  if (value_kind == FloatKind::kFloat32) {
    float f;
    std::memcpy(&f, values + 4 * j, sizeof(f));
    return f;
  }
  uint16_t bits;
  std::memcpy(&bits, values + 2 * j, sizeof(bits));
  return value_kind == FloatKind::kFloat16 ? half_bits_to_float(bits) : bfloat16_bits_to_float(bits);
}

// out <- out + scale * value, with one rounding for the product and one for the sum, computed in
// float (double for double outputs). Half and bfloat16 outputs are widened to float, updated and
// rounded back after every message. Which NaN an IEEE operation returns when both operands are
// NaN differs between instruction sequences, so a NaN result is always stored as the positive
// quiet NaN without payload.
GCOMP_HD inline void accumulate_scaled(float* out, float value, float scale) {
  const float sum = add_rn(*out, mul_rn(value, scale));
  *out = sum != sum ? float_from_bits(0x7FC00000u) : sum;
}
GCOMP_HD inline void accumulate_scaled(double* out, float value, double scale) {
  const double sum = add_rn(*out, mul_rn(static_cast<double>(value), scale));
  *out = sum != sum ? static_cast<double>(float_from_bits(0x7FC00000u)) : sum;
}
GCOMP_HD inline void accumulate_scaled(Half16* out, float value, float scale) {
  const float sum = add_rn(half_bits_to_float(out->bits), mul_rn(value, scale));
  out->bits = sum != sum ? uint16_t(0x7E00u) : float_to_half_bits(sum);
}
GCOMP_HD inline void accumulate_scaled(BFloat16Bits* out, float value, float scale) {
  const float sum = add_rn(bfloat16_bits_to_float(out->bits), mul_rn(value, scale));
  out->bits = sum != sum ? uint16_t(0x7FC0u) : float_to_bfloat16_bits(sum);
}

// ---------------------------------------------------------------------------------------------
// Magnitude keys: unsigned integers ordered like |x|, with every NaN above +inf
// ---------------------------------------------------------------------------------------------
// For IEEE formats the bits of |x| already sort like |x| (+0 and -0 share key 0). All NaNs map to
// one key just above +inf, so a NaN is "largest", NaNs tie among themselves (the smaller index
// wins), and sorting integers never meets the undefined behaviour of comparing NaN floats. Keys
// stay below the sign bit, so the reference can hold them in signed torch integers. Since every
// NaN's |x| bits exceed the NaN key, key == min(|x| bits, NaN key): SIMD code may compute it so.

constexpr uint32_t kNanKeyFloat32 = 0x7F800001u;
constexpr uint64_t kNanKeyFloat64 = 0x7FF0000000000001ull;
constexpr uint32_t kNanKeyFloat16 = 0x7C01u;
constexpr uint32_t kNanKeyBFloat16 = 0x7F81u;

GCOMP_HD inline uint32_t magnitude_key(float x) {
  const uint32_t a = bits_of(x) & 0x7FFFFFFFu;
  return a < kNanKeyFloat32 ? a : kNanKeyFloat32;
}
GCOMP_HD inline uint64_t magnitude_key(double x) {
  const uint64_t a = bits_of(x) & 0x7FFFFFFFFFFFFFFFull;
  return a < kNanKeyFloat64 ? a : kNanKeyFloat64;
}
GCOMP_HD inline uint32_t magnitude_key(Half16 x) {
  const uint32_t a = x.bits & 0x7FFFu;
  return a < kNanKeyFloat16 ? a : kNanKeyFloat16;
}
GCOMP_HD inline uint32_t magnitude_key(BFloat16Bits x) {
  const uint32_t a = x.bits & 0x7FFFu;
  return a < kNanKeyBFloat16 ? a : kNanKeyBFloat16;
}

// |x| as bits, NaN payloads kept. For every key value `t`, magnitude_bits(x) >= t exactly when
// magnitude_key(x) >= t (a NaN's bits are at least the NaN key), so a scan can test blocks for
// "anything at or above t" with this cheaper, vectorisable function.
GCOMP_HD inline uint32_t magnitude_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }
GCOMP_HD inline uint64_t magnitude_bits(double x) { return bits_of(x) & 0x7FFFFFFFFFFFFFFFull; }
GCOMP_HD inline uint32_t magnitude_bits(Half16 x) { return x.bits & 0x7FFFu; }
GCOMP_HD inline uint32_t magnitude_bits(BFloat16Bits x) { return x.bits & 0x7FFFu; }

// The key type that orders a given input type.
template <class In>
struct KeyOf {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// ---------------------------------------------------------------------------------------------
// Bit-packed indices
// ---------------------------------------------------------------------------------------------
// Index j occupies stream bits [j*bits, (j+1)*bits), stream bit p being bit (p % 8) of byte p / 8,
// least significant bit of the index first. Eight consecutive indices fill exactly `bits` bytes,
// so groups of eight are byte aligned and can be written or read independently (in parallel).

constexpr int kIndexGroup = 8;
constexpr int kMaxIndexBits = 56;  // keeps the 64-bit shift registers below from overflowing
constexpr int64_t kMaxLayerNumel = int64_t(1) << kMaxIndexBits;

// max(1, ceil(log2(numel))): the fewest bits that hold every index in [0, numel).
GCOMP_HD inline int index_bits(int64_t numel) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < numel) ++bits;
  return bits;
}

GCOMP_HD inline int64_t packed_index_bytes(int64_t count, int bits) {
  return (count * bits + 7) / 8;
}

// Writes `count` (<= 8) indices, each < 2^bits, as packed_index_bytes(count, bits) bytes.
GCOMP_HD inline void pack_index_group(const int64_t* indices, int count, int bits, uint8_t* out) {
  uint64_t pending = 0;
  int pending_bits = 0;
  for (int t = 0; t < count; ++t) {
    pending |= static_cast<uint64_t>(indices[t]) << pending_bits;
    pending_bits += bits;
    while (pending_bits >= 8) {
      *out++ = static_cast<uint8_t>(pending & 0xFFu);
      pending >>= 8;
      pending_bits -= 8;
    }
  }
  if (pending_bits > 0) *out = static_cast<uint8_t>(pending & 0xFFu);
}

// Reads `count` (<= 8) packed indices; reads exactly packed_index_bytes(count, bits) bytes.
GCOMP_HD inline void unpack_index_group(const uint8_t* in, int count, int bits, int64_t* indices) {
  const uint64_t mask = (uint64_t(1) << bits) - 1u;
  uint64_t pending = 0;
  int pending_bits = 0;
  for (int t = 0; t < count; ++t) {
    while (pending_bits < bits) {
      pending |= static_cast<uint64_t>(*in++) << pending_bits;
      pending_bits += 8;
    }
    indices[t] = static_cast<int64_t>(pending & mask);
    pending >>= bits;
    pending_bits -= bits;
  }
}

// Random access to packed index j; touches only the bytes that hold it.
GCOMP_HD inline int64_t read_packed_index(const uint8_t* payload, int64_t j, int bits) {
  const int64_t first_bit = j * bits;
  const uint8_t* in = payload + first_bit / 8;
  const int skip = static_cast<int>(first_bit % 8);
  const int n_bytes = (skip + bits + 7) / 8;  // <= 8 because bits <= 56
  uint64_t window = 0;
  for (int b = 0; b < n_bytes; ++b) window |= static_cast<uint64_t>(in[b]) << (8 * b);
  return static_cast<int64_t>((window >> skip) & ((uint64_t(1) << bits) - 1u));
}

// ---------------------------------------------------------------------------------------------
// Bitmap indices: bit i (bit i % 8 of byte i / 8) set <=> index i selected
// ---------------------------------------------------------------------------------------------

GCOMP_HD inline int64_t bitmap_bytes(int64_t numel) { return (numel + 7) / 8; }
GCOMP_HD inline void bitmap_set(uint8_t* bitmap, int64_t i) {
  bitmap[i >> 3] = static_cast<uint8_t>(bitmap[i >> 3] | (1u << (i & 7)));
}
GCOMP_HD inline bool bitmap_test(const uint8_t* bitmap, int64_t i) {
  return (bitmap[i >> 3] >> (i & 7)) & 1u;
}
// Bitmaps are scanned 64 bits at a time: word w holds bitmap bits [64w, 64w + 64), bit i of the
// bitmap being bit (i % 64) of the word whatever the host's byte order.
GCOMP_HD inline uint64_t load_bitmap_word(const uint8_t* bytes, int n_bytes) {
#if defined(__CUDA_ARCH__) || (defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
  if (n_bytes == 8) {  // little-endian: the bytes already are the word
    uint64_t word;
    std::memcpy(&word, bytes, sizeof(word));
    return word;
  }
#endif
  uint64_t word = 0;
  for (int b = 0; b < n_bytes; ++b) word |= static_cast<uint64_t>(bytes[b]) << (8 * b);
  return word;
}
GCOMP_HD inline int popcount64(uint64_t word) {
#if defined(__CUDA_ARCH__)
  return __popcll(word);
#else
  word = word - ((word >> 1) & 0x5555555555555555ull);
  word = (word & 0x3333333333333333ull) + ((word >> 2) & 0x3333333333333333ull);
  word = (word + (word >> 4)) & 0x0F0F0F0F0F0F0F0Full;
  return static_cast<int>((word * 0x0101010101010101ull) >> 56);
#endif
}
GCOMP_HD inline int lowest_set_bit(uint64_t word) {  // word != 0
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(word)) - 1;
#else
  return __builtin_ctzll(word);
#endif
}
// Bits of the last bitmap byte at positions >= numel; they must be zero in a valid message.
GCOMP_HD inline uint8_t bitmap_tail_mask(int64_t numel) {
  const int used = static_cast<int>(numel & 7);
  return used == 0 ? uint8_t(0) : static_cast<uint8_t>(0xFFu << used);
}

// ---------------------------------------------------------------------------------------------
// Message layout
// ---------------------------------------------------------------------------------------------

constexpr int64_t kSectionAlign = 8;

GCOMP_HD inline int64_t pad_section(int64_t n_bytes) {
  return (n_bytes + kSectionAlign - 1) / kSectionAlign * kSectionAlign;
}

// Bit-packing wins ties: it needs no popcount to decode.
GCOMP_HD inline bool layer_uses_bitmap(int64_t numel, int64_t k) {
  return pad_section(bitmap_bytes(numel)) < pad_section(packed_index_bytes(k, index_bits(numel)));
}

// Where one layer's section sits inside the message (all offsets from the message start).
struct LayerSection {
  int64_t value_offset;
  int64_t value_bytes;          // padded
  int64_t index_offset;
  int64_t index_bytes;          // padded
  int64_t index_payload_bytes;  // without padding
  int32_t bits;                 // bits per packed index (also reported for bitmap layers)
  int32_t bitmap;               // 1: bitmap, 0: bit-packed
};

GCOMP_HD inline LayerSection layer_section(int64_t section_start, int64_t numel, int64_t k,
                                           FloatKind value_kind) {
  LayerSection s;
  s.bits = index_bits(numel);
  s.bitmap = layer_uses_bitmap(numel, k) ? 1 : 0;
  s.value_offset = section_start;
  s.value_bytes = pad_section(k * float_kind_size(value_kind));
  s.index_offset = s.value_offset + s.value_bytes;
  s.index_payload_bytes = s.bitmap ? bitmap_bytes(numel) : packed_index_bytes(k, s.bits);
  s.index_bytes = pad_section(s.index_payload_bytes);
  return s;
}

GCOMP_HD inline int64_t layer_section_end(const LayerSection& s) {
  return s.index_offset + s.index_bytes;
}

}  // namespace format
}  // namespace gcomp
