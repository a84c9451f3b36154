// CPU kernel bodies of the quantized message ops, free of torch so they compile (and can be
// inspected or benchmarked) with a plain C++ compiler. Used by csrc/quantize_ops.cpp, which cuts
// the bucket into work units and calls one of the per-SIMD-level entry points below per unit.
//
// The kernels are plain loops over blocks of 64 entries (fixed trip counts, no branches, integer
// reductions), written for the compiler's vectoriser. Each SIMD level compiles the same inline
// bodies with a function target attribute (AVX-512, AVX2, or the baseline), so the build needs no
// -m flags. The same IEEE operations run at every level (-ffp-contract=off: nothing fused), hence
// the same bits. All per-entry math comes from gcomp/quantize_format.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gcomp/quantize_format.h"

namespace gcomp {
namespace quantize_cpu {

using quantize::levels;

#if defined(__GNUC__)
#define GCOMP_ALWAYS_INLINE inline __attribute__((always_inline))
typedef uint16_t alias_u16 __attribute__((may_alias));
typedef uint32_t alias_u32 __attribute__((may_alias));
typedef uint64_t alias_u64 __attribute__((may_alias));
#else
#define GCOMP_ALWAYS_INLINE inline
typedef uint16_t alias_u16;
typedef uint32_t alias_u32;
typedef uint64_t alias_u64;
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define GCOMP_QUANTIZE_X86 1
#include <immintrin.h>
#endif

constexpr int64_t kBlock = 64;  // entries per inner block: whole bytes of codes at every width

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

// Largest |x| bit pattern of x[0..n): an integer max, which the compiler vectorises.
GCOMP_ALWAYS_INLINE uint32_t largest_magnitude_bits(const float* x, int64_t n) {
  const alias_u32* bits = reinterpret_cast<const alias_u32*>(x);
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t magnitude = bits[i] & 0x7FFFFFFFu;
    top = magnitude > top ? magnitude : top;
  }
  return top;
}

// Packs kBlock one-byte codes (each < 2^Bits) LSB first into kBlock * Bits / 8 bytes.
template <int Bits>
GCOMP_ALWAYS_INLINE void pack_block_codes(const uint8_t* code, uint8_t* out) {
  if constexpr (Bits == 8) {
    std::memcpy(out, code, kBlock);
  } else if constexpr (Bits == 4) {
    const alias_u16* pairs = reinterpret_cast<const alias_u16*>(code);
    for (int j = 0; j < kBlock / 2; ++j) {
      const uint32_t w = pairs[j];  // c0 | c1 << 8
      out[j] = static_cast<uint8_t>(w | (w >> 4));
    }
  } else if constexpr (Bits == 2) {
    const alias_u32* quads = reinterpret_cast<const alias_u32*>(code);
    for (int j = 0; j < kBlock / 4; ++j) {
      const uint32_t w = quads[j];  // c0 | c1 << 8 | c2 << 16 | c3 << 24
      out[j] = static_cast<uint8_t>(w | (w >> 6) | (w >> 12) | (w >> 18));
    }
  } else {
    static_assert(Bits == 1, "bits");
    const alias_u64* octets = reinterpret_cast<const alias_u64*>(code);
    for (int j = 0; j < kBlock / 8; ++j) {
      // Byte k (0 or 1) of w lands on bit 56 + k of the product; nothing else reaches bits 56..63.
      out[j] = static_cast<uint8_t>((octets[j] * 0x0102040810204080ull) >> 56);
    }
  }
}

// Writes the codes of entries x[0..n) (n <= kBlock) of one chunk to `out` (ceil(n * Bits / 8)
// bytes; the high bits of a last partial byte are zero). For 1 bit also returns sum a_i.
// The codes of x[0..count) into code[] (count is kBlock, or less for a chunk's last block); for 1
// bit also returns sum a_i. Separate simple loops: the noise hash inside the code loop, or a
// variable trip count, keeps the compiler from vectorising.
template <int Bits, bool Stochastic, bool Regular, int64_t Count>
GCOMP_ALWAYS_INLINE int32_t block_codes(const float* x, int64_t count, float factor, uint32_t seed, uint32_t index,
                                        uint8_t* code) {
  const int64_t n = Count > 0 ? Count : count;
  int32_t fixed_sum = 0;  // <= 64 * 2^24: fits
  if constexpr (Bits == 1) {
    for (int64_t i = 0; i < n; ++i) code[i] = static_cast<uint8_t>(quantize::sign_code(x[i]));
    for (int64_t i = 0; i < n; ++i) fixed_sum += quantize::sign_fixed(x[i], factor);
  } else if constexpr (Stochastic) {
    alignas(64) float u[kBlock];
    for (int64_t i = 0; i < n; ++i) u[i] = quantize::uniform_noise(seed, index + static_cast<uint32_t>(i));
    if constexpr (Regular) {
      for (int64_t i = 0; i < n; ++i) {
        code[i] = static_cast<uint8_t>(quantize::stochastic_code_regular(x[i], factor, levels(Bits), u[i]));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        code[i] = static_cast<uint8_t>(quantize::stochastic_code(x[i], factor, levels(Bits), u[i]));
      }
    }
  } else if constexpr (Regular) {
    for (int64_t i = 0; i < n; ++i) {
      code[i] = static_cast<uint8_t>(quantize::nearest_code_regular(x[i], factor, levels(Bits)));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) code[i] = static_cast<uint8_t>(quantize::nearest_code(x[i], factor, levels(Bits)));
  }
  return fixed_sum;
}

// Writes the codes of entries x[0..n) (n <= kBlock) of one chunk to `out` (ceil(n * Bits / 8)
// bytes; the high bits of a last partial byte are zero). For 1 bit also returns sum a_i.
template <int Bits, bool Stochastic, bool Regular>
GCOMP_ALWAYS_INLINE int64_t quantize_block(const float* x, int64_t n, float factor, uint32_t seed, uint32_t index,
                                           uint8_t* out) {
  alignas(64) uint8_t code[kBlock];
  if (n == kBlock) {
    const int32_t fixed_sum = block_codes<Bits, Stochastic, Regular, kBlock>(x, kBlock, factor, seed, index, code);
    pack_block_codes<Bits>(code, out);
    return fixed_sum;
  }
  const int32_t fixed_sum = block_codes<Bits, Stochastic, Regular, 0>(x, n, factor, seed, index, code);
  std::memset(code + n, 0, static_cast<size_t>(kBlock - n));
  alignas(64) uint8_t packed[kBlock];
  pack_block_codes<Bits>(code, packed);
  std::memcpy(out, packed, static_cast<size_t>((n * Bits + 7) / 8));
  return fixed_sum;
}

// Entries [begin, end) of one layer (begin on a chunk boundary, end one or the layer's end).
template <int Bits, bool Stochastic>
GCOMP_ALWAYS_INLINE void pack_unit_body(const float* layer, int64_t begin, int64_t end, int64_t chunk, uint32_t seed,
                                        uint8_t* scales, uint8_t* codes) {
  if constexpr (Bits == 32) {
    std::memcpy(codes + begin * 4, layer + begin, static_cast<size_t>((end - begin) * 4));
  } else {
    for (int64_t start = begin; start < end; start += chunk) {
      const int64_t n = std::min(chunk, end - start);
      const float* x = layer + start;
      const float top = quantize::chunk_max_from_bits(largest_magnitude_bits(x, n));
      const float factor = Bits == 1 ? quantize::sign_unit(top) : quantize::quantize_inverse(top, levels(Bits));
      uint8_t* out = codes + start / 8 * Bits;
      int64_t fixed_sum = 0;
      if (Bits != 1 && quantize::regular_chunk(top, factor)) {
        for (int64_t b = 0; b < n; b += kBlock) {
          quantize_block<Bits, Stochastic, true>(x + b, std::min(kBlock, n - b), factor, seed,
                                                 static_cast<uint32_t>(start + b), out + b / 8 * Bits);
        }
      } else {
        for (int64_t b = 0; b < n; b += kBlock) {
          fixed_sum += quantize_block<Bits, Stochastic, false>(x + b, std::min(kBlock, n - b), factor, seed,
                                                               static_cast<uint32_t>(start + b), out + b / 8 * Bits);
        }
      }
      const float scale = Bits == 1 ? quantize::sign_scale(static_cast<double>(fixed_sum), top, n) : top;
      std::memcpy(scales + start / chunk * 4, &scale, 4);
    }
  }
}

// What one level's entry point needs to pack a unit.
struct PackTask {
  const float* layer;
  int64_t begin;
  int64_t end;
  int64_t chunk;
  uint32_t seed;
  bool stochastic;
  uint8_t* scales;
  uint8_t* codes;
};

GCOMP_ALWAYS_INLINE void pack_unit_dispatch(const PackTask& t, int bits) {
  switch (bits) {
    case 1:
      return pack_unit_body<1, false>(t.layer, t.begin, t.end, t.chunk, 0, t.scales, t.codes);
    case 2:
      return t.stochastic ? pack_unit_body<2, true>(t.layer, t.begin, t.end, t.chunk, t.seed, t.scales, t.codes)
                          : pack_unit_body<2, false>(t.layer, t.begin, t.end, t.chunk, 0, t.scales, t.codes);
    case 4:
      return t.stochastic ? pack_unit_body<4, true>(t.layer, t.begin, t.end, t.chunk, t.seed, t.scales, t.codes)
                          : pack_unit_body<4, false>(t.layer, t.begin, t.end, t.chunk, 0, t.scales, t.codes);
    case 8:
      return t.stochastic ? pack_unit_body<8, true>(t.layer, t.begin, t.end, t.chunk, t.seed, t.scales, t.codes)
                          : pack_unit_body<8, false>(t.layer, t.begin, t.end, t.chunk, 0, t.scales, t.codes);
    default:
      return pack_unit_body<32, false>(t.layer, t.begin, t.end, t.chunk, 0, t.scales, t.codes);
  }
}

// ---------------------------------------------------------------------------------------------
// Unpacking
// ---------------------------------------------------------------------------------------------

// The kBlock codes starting at `bytes` as one byte each (for 1 bit: 0 or a nonzero byte).
template <int Bits>
GCOMP_ALWAYS_INLINE void unpack_block_codes(const uint8_t* bytes, uint8_t* code) {
  if constexpr (Bits == 8) {
    std::memcpy(code, bytes, kBlock);
  } else if constexpr (Bits == 4) {
    alias_u16* pairs = reinterpret_cast<alias_u16*>(code);
    for (int j = 0; j < kBlock / 2; ++j) {
      const uint32_t b = bytes[j];
      pairs[j] = static_cast<uint16_t>((b | (b << 4)) & 0x0F0Fu);
    }
  } else if constexpr (Bits == 2) {
    alias_u32* quads = reinterpret_cast<alias_u32*>(code);
    for (int j = 0; j < kBlock / 4; ++j) {
      const uint32_t b = bytes[j];
      quads[j] = (b | (b << 6) | (b << 12) | (b << 18)) & 0x03030303u;
    }
  } else {
    static_assert(Bits == 1, "bits");
    alias_u64* octets = reinterpret_cast<alias_u64*>(code);
    for (int j = 0; j < kBlock / 8; ++j) {
      octets[j] = (bytes[j] * 0x0101010101010101ull) & 0x8040201008040201ull;  // byte k keeps bit k
    }
  }
}

// One message's contribution to acc[0..kBlock): acc = acc + weight * value, in float32.
template <int Bits>
GCOMP_ALWAYS_INLINE void add_block(float* acc, const uint8_t* bytes, int64_t n_bytes, float scale, float weight) {
  alignas(64) uint8_t code[kBlock];
  if (n_bytes == kBlock * Bits / 8) {
    unpack_block_codes<Bits>(bytes, code);
  } else {  // a layer's last partial block: never read past its code bytes
    alignas(64) uint8_t padded[kBlock] = {};
    std::memcpy(padded, bytes, static_cast<size_t>(n_bytes));
    unpack_block_codes<Bits>(padded, code);
  }
  if constexpr (Bits == 1) {
    for (int i = 0; i < kBlock; ++i) acc[i] = quantize::accumulate(acc[i], quantize::decode_sign(code[i], scale), weight);
  } else {
    const int32_t level = levels(Bits);
    const float step = quantize::decode_step(scale, level);
    for (int i = 0; i < kBlock; ++i) acc[i] = quantize::accumulate(acc[i], quantize::decode_value(code[i], level, step), weight);
  }
}

// Adds every message to entries [b, b + n) of `out` (n <= kBlock, inside one chunk).
template <int Bits>
GCOMP_ALWAYS_INLINE void unpack_block(float* out, int64_t b, int64_t n, int64_t chunk, const uint8_t* messages,
                                      int64_t n_messages, int64_t message_bytes, int64_t scale_offset,
                                      int64_t code_offset, float weight) {
  alignas(64) float acc[kBlock];
  if (n < kBlock) std::memset(acc + n, 0, static_cast<size_t>((kBlock - n) * 4));
  std::memcpy(acc, out + b, static_cast<size_t>(n * 4));
  for (int64_t m = 0; m < n_messages; ++m) {
    const uint8_t* message = messages + m * message_bytes;
    if constexpr (Bits == 32) {
      alignas(64) float value[kBlock];
      if (n < kBlock) std::memset(value + n, 0, static_cast<size_t>((kBlock - n) * 4));
      std::memcpy(value, message + code_offset + b * 4, static_cast<size_t>(n * 4));
      for (int i = 0; i < kBlock; ++i) acc[i] = quantize::accumulate(acc[i], value[i], weight);
    } else {
      float scale;
      std::memcpy(&scale, message + scale_offset + b / chunk * 4, 4);
      add_block<Bits>(acc, message + code_offset + b / 8 * Bits, (n * Bits + 7) / 8, scale, weight);
    }
  }
  std::memcpy(out + b, acc, static_cast<size_t>(n * 4));
}

// Entries [begin, end) of one layer (begin on a chunk boundary), block by block inside each chunk.
template <int Bits>
GCOMP_ALWAYS_INLINE void unpack_unit_body(float* out, int64_t begin, int64_t end, int64_t chunk,
                                          const uint8_t* messages, int64_t n_messages, int64_t message_bytes,
                                          int64_t scale_offset, int64_t code_offset, float weight) {
  for (int64_t start = begin; start < end; start += chunk) {
    const int64_t chunk_end = std::min(end, start + chunk);
    for (int64_t b = start; b < chunk_end; b += kBlock) {
      unpack_block<Bits>(out, b, std::min(kBlock, chunk_end - b), chunk, messages, n_messages, message_bytes,
                         scale_offset, code_offset, weight);
    }
  }
}

struct UnpackTask {
  float* out;
  int64_t begin;
  int64_t end;
  int64_t chunk;
  const uint8_t* messages;
  int64_t n_messages;
  int64_t message_bytes;
  int64_t scale_offset;
  int64_t code_offset;
  float weight;
};

GCOMP_ALWAYS_INLINE void unpack_unit_dispatch(const UnpackTask& t, int bits) {
#define GCOMP_UNPACK_CASE(B)                                                                                \
  case B:                                                                                                   \
    return unpack_unit_body<B>(t.out, t.begin, t.end, t.chunk, t.messages, t.n_messages, t.message_bytes, \
                               t.scale_offset, t.code_offset, t.weight);
  switch (bits) {
    GCOMP_UNPACK_CASE(1)
    GCOMP_UNPACK_CASE(2)
    GCOMP_UNPACK_CASE(4)
    GCOMP_UNPACK_CASE(8)
    default:
      return unpack_unit_body<32>(t.out, t.begin, t.end, t.chunk, t.messages, t.n_messages, t.message_bytes,
                                  t.scale_offset, t.code_offset, t.weight);
  }
#undef GCOMP_UNPACK_CASE
}

// ---------------------------------------------------------------------------------------------
// One entry point per SIMD level: the same inline bodies compiled for that instruction set
// ---------------------------------------------------------------------------------------------

inline void pack_unit_portable(const PackTask& t, int bits) { pack_unit_dispatch(t, bits); }
inline void unpack_unit_portable(const UnpackTask& t, int bits) { unpack_unit_dispatch(t, bits); }

#ifdef GCOMP_QUANTIZE_X86
#define GCOMP_QUANTIZE_AVX2 "avx2,bmi,bmi2,popcnt,f16c"
#define GCOMP_QUANTIZE_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt,prefer-vector-width=512"

// 1 bit, with intrinsics: the compiler does not turn the sign codes into a compare mask (one
// instruction here) by itself. Same operations as the generic body: code = !(x < 0) (an unordered
// "not less than": 1 for NaN and -0.0), a_i = min(rint(|x| * unit), 2^24) summed in integers.
// Only chunks whose max and unit are finite take this path (no NaN product); the others, and a
// chunk's last partial block, run the generic code.
template <class Blocks>
GCOMP_ALWAYS_INLINE void pack_sign_unit(const PackTask& t, Blocks full_blocks) {
  for (int64_t start = t.begin; start < t.end; start += t.chunk) {
    const int64_t n = std::min(t.chunk, t.end - start);
    const float* x = t.layer + start;
    const float top = quantize::chunk_max_from_bits(largest_magnitude_bits(x, n));
    const float unit = quantize::sign_unit(top);
    uint8_t* out = t.codes + start / 8;
    int64_t fixed_sum = 0;
    int64_t b = 0;
    if (quantize::regular_chunk(top, unit)) {
      b = n / kBlock * kBlock;
      fixed_sum += full_blocks(x, n / kBlock, unit, out);
    }
    for (; b < n; b += kBlock) {
      fixed_sum += quantize_block<1, false, false>(x + b, std::min(kBlock, n - b), unit, 0, 0, out + b / 8);
    }
    const float scale = quantize::sign_scale(static_cast<double>(fixed_sum), top, n);
    std::memcpy(t.scales + start / t.chunk * 4, &scale, 4);
  }
}

// Each entry adds at most 2^24, so an int32 lane holds 2^7 - 1 entries' worth; the lanes are added
// into the 64-bit total every kFoldBlocks blocks (a block gives each AVX-512 lane 4 entries, each
// AVX2 lane 8) instead of once per block, where the horizontal sum was a fifth of the work.
constexpr int64_t kFoldBlocks = 8;

__attribute__((target(GCOMP_QUANTIZE_AVX512))) inline int64_t sign_blocks_avx512(const float* x, int64_t blocks,
                                                                                 float unit, uint8_t* out) {
  // (Relies on the default MXCSR rounding, nearest even, as every float operation here does.)
  const __m512 zero = _mm512_setzero_ps();
  const __m512 units = _mm512_set1_ps(unit);
  const __m512i one = _mm512_set1_epi32(1 << 24);
  int64_t total = 0;
  for (int64_t first = 0; first < blocks; first += kFoldBlocks) {
    const int64_t last = std::min(blocks, first + kFoldBlocks);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = first * (kBlock / 16); k < last * (kBlock / 16); ++k) {
      const __m512 v = _mm512_loadu_ps(x + 16 * k);
      const uint16_t codes = static_cast<uint16_t>(_mm512_cmp_ps_mask(v, zero, _CMP_NLT_UQ));
      std::memcpy(out + 2 * k, &codes, 2);
      // rint and the conversion in one (the default rounding mode is nearest even); the product is
      // at most 2^24 (1 + 2^-24)^2, so the integer min is the clamp.
      const __m512i fixed = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_abs_ps(v), units));
      sum = _mm512_add_epi32(sum, _mm512_min_epi32(fixed, one));
    }
    // Each lane holds at most 32 entries of 2^24 (2^29); the sixteen lanes are added in 64 bits.
    const __m512i low = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sum));
    const __m512i high = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(sum, 1));
    total += _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
  }
  return total;
}

__attribute__((target(GCOMP_QUANTIZE_AVX2))) inline int64_t sign_blocks_avx2(const float* x, int64_t blocks, float unit,
                                                                             uint8_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 units = _mm256_set1_ps(unit);
  const __m256i one = _mm256_set1_epi32(1 << 24);
  int64_t total = 0;
  for (int64_t first = 0; first < blocks; first += kFoldBlocks) {
    const int64_t last = std::min(blocks, first + kFoldBlocks);
    __m256i sum = _mm256_setzero_si256();
    // Four vectors a step: their four code bytes go out in one 32-bit store.
    for (int64_t k = first * (kBlock / 32); k < last * (kBlock / 32); ++k) {
      uint32_t codes = 0;
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_loadu_ps(x + 32 * k + 8 * j);
        codes |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NLT_UQ))) << (8 * j);
        const __m256 product = _mm256_mul_ps(_mm256_and_ps(v, magnitude), units);
        sum = _mm256_add_epi32(sum, _mm256_min_epi32(_mm256_cvtps_epi32(product), one));  // as above
      }
      std::memcpy(out + 4 * k, &codes, 4);
    }
    // Each lane holds at most 64 entries of 2^24 (2^30); the eight lanes are added in 64 bits.
    const __m256i low = _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sum));
    const __m256i high = _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sum, 1));
    const __m256i pairs = _mm256_add_epi64(low, high);
    const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
    total += _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
  }
  return total;
}

// 2 and 4 bits, round to nearest, AVX-512: in a regular chunk rint(x * inverse) lies in
// [-levels, levels], so the conversion under the default rounding mode (nearest even) is rint
// itself, and no clamp or NaN rule applies (see quantize::regular_chunk). Codes are narrowed and
// interleaved with shifts inside 64-bit lanes.
template <int Bits>
__attribute__((target(GCOMP_QUANTIZE_AVX512))) inline void nearest_block_avx512(const float* x, float inverse,
                                                                                uint8_t* out) {
  const __m512 inverses = _mm512_set1_ps(inverse);
  const __m512i level = _mm512_set1_epi32(levels(Bits));
  __m128i bytes[kBlock / 16];
  for (int k = 0; k < kBlock / 16; ++k) {
    const __m512i code = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * k), inverses)), level);
    if constexpr (Bits == 4) {  // 64-bit lane = c0 | c1 << 32  ->  low byte c0 | c1 << 4
      const __m512i pairs = _mm512_or_si512(code, _mm512_srli_epi64(code, 28));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 8 * k), _mm512_cvtepi64_epi8(pairs));
    } else {
      bytes[k] = _mm512_cvtepi32_epi8(code);  // the block's 64 codes, one byte each
    }
  }
  if constexpr (Bits == 2) {  // bytes c0..c3 of a 32-bit lane  ->  c0 | c1 << 2 | c2 << 4 | c3 << 6
    __m512i all = _mm512_castsi128_si512(bytes[0]);
    all = _mm512_inserti32x4(all, bytes[1], 1);
    all = _mm512_inserti32x4(all, bytes[2], 2);
    all = _mm512_inserti32x4(all, bytes[3], 3);
    const __m512i packed = _mm512_or_si512(_mm512_or_si512(all, _mm512_srli_epi32(all, 6)),
                                           _mm512_or_si512(_mm512_srli_epi32(all, 12), _mm512_srli_epi32(all, 18)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(packed));
  }
}

// 2, 4 and 8 bits, round to nearest, AVX2: the same conversion as above. The block's 64 codes
// (0 .. 2 * levels <= 254) are narrowed to bytes with saturating packs, which cannot saturate here;
// the packs work inside 128-bit lanes, so one permutation of 32-bit groups puts the bytes back in
// order. Then multiply-adds combine neighbours: c0 + 16 c1 (4 bits), c0 + 4 c1 + 16 c2 + 64 c3
// (2 bits), the same bytes as pack_block_codes.
template <int Bits>
__attribute__((target(GCOMP_QUANTIZE_AVX2))) inline void nearest_block_avx2(const float* x, float inverse,
                                                                            uint8_t* out) {
  const __m256 inverses = _mm256_set1_ps(inverse);
  const __m256i level = _mm256_set1_epi32(levels(Bits));
  const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i bytes[2];  // codes 0..31 and 32..63, one byte each
  for (int half = 0; half < 2; ++half) {
    __m256i code[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(x + 32 * half + 8 * k);
      code[k] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, inverses)), level);
    }
    // bytes [c0 0-3, c1 0-3, c2 0-3, c3 0-3 | c0 4-7, c1 4-7, c2 4-7, c3 4-7] -> c0 0-7, c1 0-7, ...
    const __m256i packed = _mm256_packus_epi16(_mm256_packs_epi32(code[0], code[1]), _mm256_packs_epi32(code[2], code[3]));
    bytes[half] = _mm256_permutevar8x32_epi32(packed, in_order);
  }
  if constexpr (Bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bytes[0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), bytes[1]);
  } else if constexpr (Bits == 4) {
    const __m256i weights = _mm256_set1_epi16(1 | 16 << 8);
    const __m256i low = _mm256_maddubs_epi16(bytes[0], weights);  // pairs 0..15 (<= 238 each)
    const __m256i high = _mm256_maddubs_epi16(bytes[1], weights);  // pairs 16..31
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(low, high), 0xD8);  // qwords 0, 2, 1, 3
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
  } else {
    static_assert(Bits == 2, "bits");
    const __m256i pair_weights = _mm256_set1_epi16(1 | 4 << 8);
    const __m256i quad_weights = _mm256_set1_epi32(1 | 16 << 16);
    const __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes[0], pair_weights), quad_weights);  // quads 0..7
    const __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes[1], pair_weights), quad_weights);  // 8..15
    const __m256i narrowed = _mm256_packus_epi16(_mm256_packs_epi32(low, high), _mm256_setzero_si256());
    const __m256i packed = _mm256_permutevar8x32_epi32(narrowed, in_order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  }
}

// A unit of 2/4/8-bit round-to-nearest packing with one level's block kernel for the full blocks of
// regular chunks; partial blocks and irregular chunks (NaN, infinity) take the generic code.
template <int Bits, class Block>
GCOMP_ALWAYS_INLINE void pack_nearest_unit(const PackTask& t, Block full_block) {
  for (int64_t start = t.begin; start < t.end; start += t.chunk) {
    const int64_t n = std::min(t.chunk, t.end - start);
    const float* x = t.layer + start;
    const float top = quantize::chunk_max_from_bits(largest_magnitude_bits(x, n));
    const float inverse = quantize::quantize_inverse(top, levels(Bits));
    uint8_t* out = t.codes + start / 8 * Bits;
    int64_t b = 0;
    if (quantize::regular_chunk(top, inverse)) {
      for (; b + kBlock <= n; b += kBlock) full_block(x + b, inverse, out + b / 8 * Bits);
      for (; b < n; b += kBlock) {
        quantize_block<Bits, false, true>(x + b, std::min(kBlock, n - b), inverse, 0, 0, out + b / 8 * Bits);
      }
    } else {
      for (; b < n; b += kBlock) {
        quantize_block<Bits, false, false>(x + b, std::min(kBlock, n - b), inverse, 0, 0, out + b / 8 * Bits);
      }
    }
    std::memcpy(t.scales + start / t.chunk * 4, &top, 4);
  }
}

__attribute__((target(GCOMP_QUANTIZE_AVX2))) inline void pack_unit_avx2(const PackTask& t, int bits) {
  if (bits == 1) return pack_sign_unit(t, sign_blocks_avx2);
  if (bits == 2 && !t.stochastic) return pack_nearest_unit<2>(t, nearest_block_avx2<2>);
  if (bits == 4 && !t.stochastic) return pack_nearest_unit<4>(t, nearest_block_avx2<4>);
  if (bits == 8 && !t.stochastic) return pack_nearest_unit<8>(t, nearest_block_avx2<8>);
  pack_unit_dispatch(t, bits);
}
__attribute__((target(GCOMP_QUANTIZE_AVX2))) inline void unpack_unit_avx2(const UnpackTask& t, int bits) {
  unpack_unit_dispatch(t, bits);
}
__attribute__((target(GCOMP_QUANTIZE_AVX512))) inline void pack_unit_avx512(const PackTask& t, int bits) {
  if (bits == 1) return pack_sign_unit(t, sign_blocks_avx512);
  if (bits == 2 && !t.stochastic) return pack_nearest_unit<2>(t, nearest_block_avx512<2>);
  if (bits == 4 && !t.stochastic) return pack_nearest_unit<4>(t, nearest_block_avx512<4>);
  pack_unit_dispatch(t, bits);
}
__attribute__((target(GCOMP_QUANTIZE_AVX512))) inline void unpack_unit_avx512(const UnpackTask& t, int bits) {
  unpack_unit_dispatch(t, bits);
}
#endif

using PackEntry = void (*)(const PackTask&, int);
using UnpackEntry = void (*)(const UnpackTask&, int);

inline PackEntry pack_entry(int level) {
#ifdef GCOMP_QUANTIZE_X86
  if (level >= 2) return pack_unit_avx512;
  if (level == 1) return pack_unit_avx2;
#endif
  (void)level;
  return pack_unit_portable;
}

inline UnpackEntry unpack_entry(int level) {
#ifdef GCOMP_QUANTIZE_X86
  if (level >= 2) return unpack_unit_avx512;
  if (level == 1) return unpack_unit_avx2;
#endif
  (void)level;
  return unpack_unit_portable;
}

}  // namespace quantize_cpu
}  // namespace gcomp
