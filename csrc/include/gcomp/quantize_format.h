// The quantized message format of gcomp, element by element and chunk by chunk.
//
// Everything that decides a byte of a quantized message, or a bit of an unpacked sum, lives here,
// so the CPU kernels (quantize_ops.cpp), the CUDA kernels (quantize_kernels.cu, also compiled at
// run time by NVRTC) and, by mirroring, the pure-torch reference (gcomp/compress/quantize.py,
// whose docstring is the specification) cannot drift apart. No torch header: plain g++, nvcc and
// NVRTC all compile it.
//
// Message of one bucket = for each layer, in order:
//   scales : one float32 per chunk of `chunk` entries (none for 32 bits), padded to 8 bytes
//   codes  : `bits` bits per entry, LSB first, padded to 8 bytes (32 bits: the float32 bits)
// Padding bytes are written as zero and ignored when reading.
//
// Every arithmetic step is one IEEE operation in round-to-nearest-even, never fused (the CPU build
// passes -ffp-contract=off; device code uses the __f*_rn / __d*_rn intrinsics through mul_rn and
// friends), which is what makes the three implementations agree bit for bit.
#pragma once

#include "gcomp/sparse_format.h"  // bits_of, float_from_bits, mul_rn, add_rn, GCOMP_HD, <cstdint>

#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace gcomp {
namespace quantize {

using format::add_rn;
using format::bits_of;
using format::float_from_bits;
using format::mul_rn;

// Sections are padded to this many bytes, so scales stay aligned.
constexpr int64_t kSectionAlign = 8;
// Fixed-point unit of the 1-bit scale's exact mean (2^24).
constexpr float kSignScaleOne = 16777216.0f;
constexpr uint32_t kQuietNanBits = 0x7FC00000u;
constexpr uint32_t kInfinityBits = 0x7F800000u;
constexpr uint32_t kGolden = 0x9E3779B9u;
// The largest chunk (entries sharing one scale): 2^24 keeps the 1-bit sum below 2^48, exact in
// float64, and the count n * 2^24 exact as well.
constexpr int64_t kMaxChunk = int64_t(1) << 24;
constexpr int64_t kMaxLayerNumel = (int64_t(1) << 32) - 1;

GCOMP_HD inline bool valid_bits(int64_t bits) {
  return bits == 1 || bits == 2 || bits == 4 || bits == 8 || bits == 32;
}
GCOMP_HD inline bool valid_chunk(int64_t chunk) { return chunk >= 8 && chunk % 8 == 0 && chunk <= kMaxChunk; }

// Largest |q| of a `bits`-bit code (2: 1, 4: 7, 8: 127).
GCOMP_HD inline int32_t levels(int32_t bits) { return (1 << (bits - 1)) - 1; }

GCOMP_HD inline int64_t pad_section(int64_t n_bytes) {
  return (n_bytes + kSectionAlign - 1) / kSectionAlign * kSectionAlign;
}
GCOMP_HD inline int64_t chunk_count(int64_t numel, int64_t bits, int64_t chunk) {
  return bits == 32 ? 0 : (numel + chunk - 1) / chunk;
}
GCOMP_HD inline int64_t scale_section_bytes(int64_t numel, int64_t bits, int64_t chunk) {
  return pad_section(4 * chunk_count(numel, bits, chunk));
}
GCOMP_HD inline int64_t code_section_bytes(int64_t numel, int64_t bits) { return pad_section((numel * bits + 7) / 8); }
// Both sections of one layer.
GCOMP_HD inline int64_t layer_message_bytes(int64_t numel, int64_t bits, int64_t chunk) {
  return scale_section_bytes(numel, bits, chunk) + code_section_bytes(numel, bits);
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding noise: u_i = (mix32(seed + i * 0x9E3779B9) >> 8) * 2^-24, in [0, 1)
// ---------------------------------------------------------------------------------------------

GCOMP_HD inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// `index` is the entry's index inside its layer (below 2^32), `seed` the layer's seed mod 2^32.
GCOMP_HD inline float uniform_noise(uint32_t seed, uint32_t index) {
  const uint32_t hashed = mix32(index * kGolden + seed) >> 8;  // < 2^24: exact as float
  return mul_rn(static_cast<float>(static_cast<int32_t>(hashed)), 5.9604644775390625e-8f);  // * 2^-24, exact
}

// ---------------------------------------------------------------------------------------------
// Per chunk: the scale
// ---------------------------------------------------------------------------------------------

// The chunk's max |x| from the largest |x| bit pattern (x & 0x7FFFFFFF) over the chunk: integer
// order is magnitude order, and every NaN lies above +inf, so a chunk holding a NaN gets the
// canonical quiet NaN and one holding an infinity (but no NaN) gets +inf.
GCOMP_HD inline float chunk_max_from_bits(uint32_t largest_magnitude_bits) {
  return float_from_bits(largest_magnitude_bits > kInfinityBits ? kQuietNanBits : largest_magnitude_bits);
}

// 2/4/8 bits: the factor the entries are multiplied with, levels / m (0 unless m > 0, so NaN and
// zero chunks quantize to q = 0; an infinite m gives 0 as well).
GCOMP_HD inline float quantize_inverse(float top, int32_t level) {
#if defined(__CUDA_ARCH__)
  return top > 0.0f ? __fdiv_rn(static_cast<float>(level), top) : 0.0f;
#else
  return top > 0.0f ? static_cast<float>(level) / top : 0.0f;
#endif
}

// 1 bit: the fixed-point factor 2^24 / m (0 unless m is finite and > 0). It may overflow to +inf
// when m is subnormal; then a zero entry's product is NaN, which counts as 0 (see sign_fixed).
GCOMP_HD inline bool finite_bits(uint32_t magnitude_bits) { return magnitude_bits < kInfinityBits; }
GCOMP_HD inline float sign_unit(float top) {
  const bool finite = finite_bits(bits_of(top) & 0x7FFFFFFFu);
#if defined(__CUDA_ARCH__)
  return finite && top > 0.0f ? __fdiv_rn(kSignScaleOne, top) : 0.0f;
#else
  return finite && top > 0.0f ? kSignScaleOne / top : 0.0f;
#endif
}

// a_i = min(2^24, rint(|x_i| * unit)); a NaN product (only 0 * inf) counts 0. (Written as an
// integer select on the product, the form the compiler vectorises together with the sum.)
GCOMP_HD inline int32_t sign_fixed(float x, float unit) {
#if defined(__CUDA_ARCH__)
  const float product = __fmul_rn(fabsf(x), unit);
  const float r = rintf(product);
#else
  const float product = std::fabs(x) * unit;
  const float r = std::rint(product);
#endif
  const int32_t a = static_cast<int32_t>(r < kSignScaleOne ? r : kSignScaleOne);  // NaN: 2^24, dropped below
  return product == product ? a : 0;
}

// scale = float32(float64(sum a_i) * float64(m) / (float64(n) * 2^24)); a non-finite m is the
// scale itself (NaN or +inf, so the chunk decodes to non-finite values).
GCOMP_HD inline float sign_scale(double fixed_sum, float top, int64_t n) {
  if (!finite_bits(bits_of(top) & 0x7FFFFFFFu)) return top;
#if defined(__CUDA_ARCH__)
  const double numerator = __dmul_rn(fixed_sum, static_cast<double>(top));
  const double denominator = __dmul_rn(static_cast<double>(n), 16777216.0);
  return __double2float_rn(__ddiv_rn(numerator, denominator));
#else
  const double numerator = fixed_sum * static_cast<double>(top);
  const double denominator = static_cast<double>(n) * 16777216.0;
  return static_cast<float>(numerator / denominator);
#endif
}

// ---------------------------------------------------------------------------------------------
// Per entry: codes
// ---------------------------------------------------------------------------------------------

// 1 bit: 1 for x >= 0 (and NaN, and -0.0), 0 for x < 0.
GCOMP_HD inline uint32_t sign_code(float x) { return x < 0.0f ? 0u : 1u; }

// Clamp to [-level, level]; a NaN `scaled` gives 0 (q is computed from it, so it is NaN as well).
GCOMP_HD inline float clamp_level(float q, float scaled, float level) {
  const float clamped = q < -level ? -level : (q > level ? level : q);
  return scaled != scaled ? 0.0f : clamped;
}

// 2/4/8 bits, round to nearest even: q = rint(x * inverse), clamped; code = q + level.
GCOMP_HD inline uint32_t nearest_code(float x, float inverse, int32_t level) {
  const float scaled = mul_rn(x, inverse);
#if defined(__CUDA_ARCH__)
  const float q = rintf(scaled);
#else
  const float q = std::rint(scaled);
#endif
  const float flevel = static_cast<float>(level);
  return static_cast<uint32_t>(static_cast<int32_t>(clamp_level(q, scaled, flevel)) + level);
}

// floor(t), exactly. On the CPU it is written with rint, whose vector form the compiler may use
// under the default -ftrapping-math (it will not vectorise floor there): rint(t) is the nearest
// integer, one too large exactly when it exceeds t (for |t| >= 2^23, and for inf and NaN, rint(t)
// is t itself).
GCOMP_HD inline float floor_exact(float t) {
#if defined(__CUDA_ARCH__)
  return floorf(t);
#else
  const float r = std::rint(t);
  return r > t ? r - 1.0f : r;
#endif
}

// 2/4/8 bits, stochastic: q = floor(x * inverse + u), two roundings, clamped; code = q + level.
GCOMP_HD inline uint32_t stochastic_code(float x, float inverse, int32_t level, float u) {
  const float scaled = mul_rn(x, inverse);
  const float q = floor_exact(add_rn(scaled, u));
  const float flevel = static_cast<float>(level);
  return static_cast<uint32_t>(static_cast<int32_t>(clamp_level(q, scaled, flevel)) + level);
}

// Chunks whose max m and factor levels / m are both finite ("regular": no NaN, no infinity, m not
// so small that levels / m overflows) take shortcuts that give the same codes:
//  * |x| <= m, so |x * inverse| <= levels * (1 + 2^-24)^2 < levels + 1/2: rint never leaves
//    [-levels, levels] and the clamp is a no-op; the product is finite, so the NaN rule is too.
//  * stochastic rounding still needs the clamp (scaled + u may round up to levels + 1, or scaled
//    may lie a hair below -levels), but not the NaN rule.
GCOMP_HD inline bool regular_chunk(float top, float inverse) {
  return finite_bits(bits_of(top) & 0x7FFFFFFFu) && finite_bits(bits_of(inverse) & 0x7FFFFFFFu);
}

GCOMP_HD inline uint32_t nearest_code_regular(float x, float inverse, int32_t level) {
#if defined(__CUDA_ARCH__)
  const float q = rintf(mul_rn(x, inverse));
#else
  const float q = std::rint(mul_rn(x, inverse));
#endif
  return static_cast<uint32_t>(static_cast<int32_t>(q) + level);
}

GCOMP_HD inline uint32_t stochastic_code_regular(float x, float inverse, int32_t level, float u) {
  const float t = add_rn(mul_rn(x, inverse), u);  // |t| < levels + 2: an int holds it
#if defined(__CUDA_ARCH__)
  const int32_t q = static_cast<int32_t>(floorf(t));
#else
  // floor in integers (the form the compiler vectorises): rint, minus one where it rounded up.
  const float r = std::rint(t);
  const int32_t q = static_cast<int32_t>(r) - static_cast<int32_t>(r > t);
#endif
  const int32_t clamped = q < -level ? -level : (q > level ? level : q);
  return static_cast<uint32_t>(clamped + level);
}

// ---------------------------------------------------------------------------------------------
// Decoding and accumulation
// ---------------------------------------------------------------------------------------------

// 2/4/8 bits: the step of a chunk, m / level.
GCOMP_HD inline float decode_step(float scale, int32_t level) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(scale, static_cast<float>(level));
#else
  return scale / static_cast<float>(level);
#endif
}

// The value of a code (2/4/8 bits): (code - level) * step.
GCOMP_HD inline float decode_value(uint32_t code, int32_t level, float step) {
  return mul_rn(static_cast<float>(static_cast<int32_t>(code) - level), step);
}

// The value of a sign code (1 bit): +scale or -scale.
GCOMP_HD inline float decode_sign(uint32_t code, float scale) { return code != 0 ? scale : -scale; }

// out + weight * value: the product rounded, then the sum. A NaN sum is stored as the quiet NaN
// 0x7FC00000 (the NaN an operation produces differs between CPUs and GPUs).
GCOMP_HD inline float accumulate(float out, float value, float weight) {
  const float sum = add_rn(out, mul_rn(value, weight));
  return sum != sum ? float_from_bits(kQuietNanBits) : sum;
}

// ---------------------------------------------------------------------------------------------
// Code bytes
// ---------------------------------------------------------------------------------------------

// Entry i's code sits at bits (i * bits) % 8 of byte (i * bits) / 8 (bits in {1, 2, 4, 8}).
GCOMP_HD inline uint32_t read_code(const uint8_t* codes, int64_t i, int32_t bits) {
  const int64_t bit = i * bits;
  return (static_cast<uint32_t>(codes[bit >> 3]) >> (bit & 7)) & ((1u << bits) - 1u);
}

}  // namespace quantize
}  // namespace gcomp
