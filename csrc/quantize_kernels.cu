// CUDA kernels of the quantized message ops, on raw pointers (no torch header: plain nvcc builds
// it, and gcomp/native_cupy.py compiles the same file with NVRTC). Per-entry and per-chunk math
// (scales, codes, noise, decoding, accumulation) comes from gcomp/quantize_format.h, the same
// functions the CPU kernels call, and uses the __f*_rn / __d*_rn intrinsics there, so nothing is
// fused into an FMA and the bytes and sums equal the CPU kernels' and the pure-torch twin's.
//
// quantize_pack: one block per chunk ("tile"), all layers batched in one launch:
//   1. the block reduces max |x| over the chunk (as integer bit patterns: NaN above +inf);
//   2. every thread writes whole code bytes (8 / bits entries each), so no two threads share a
//      byte; for 1 bit the block also sums the fixed-point magnitudes a_i (exact, in integers),
//      and thread 0 writes the chunk's scale.
// quantize_unpack_add: one block per chunk; every thread owns entries and adds message 0, 1, 2,
// ... to each in that order (the fixed summation order every implementation uses).
#include "gcomp/quantize_format.h"
#include "gcomp/quantize_kernels.h"

namespace gcomp {
namespace cuda {
#if defined(__CUDACC_RTC__)
// A run-time compilation (NVRTC, gcomp/native_cupy.py) looks kernels up by name from Python, so
// they get external linkage there: gcomp::cuda::rtc::<kernel>.
namespace rtc {
#else
namespace {
#endif

constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeWarps = kQuantizeThreads / 32;
constexpr int64_t kQuantizeMaxGridBlocks = int64_t(1) << 20;  // grid-stride kernels cap their grid here

// Index of the layer holding tile `tile` (layers' first_tile fields are increasing).
__device__ int64_t find_tile_layer(const QuantizeLayer* layers, int64_t n_layers, int64_t tile) {
  int64_t lo = 0, hi = n_layers;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (layers[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Block-wide max of uint32 values (every thread gets the result). `shared` holds kQuantizeWarps.
__device__ uint32_t block_max(uint32_t value, uint32_t* shared) {
  for (int delta = 16; delta > 0; delta >>= 1) {
    const uint32_t other = __shfl_xor_sync(0xFFFFFFFFu, value, delta);
    value = other > value ? other : value;
  }
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = value;
  __syncthreads();
  uint32_t result = shared[0];
  for (int w = 1; w < kQuantizeWarps; ++w) result = shared[w] > result ? shared[w] : result;
  __syncthreads();  // `shared` may be reused right after
  return result;
}

// Block-wide sum of integers (every thread gets the result). `shared` holds kQuantizeWarps.
__device__ unsigned long long block_sum(unsigned long long value, unsigned long long* shared) {
  for (int delta = 16; delta > 0; delta >>= 1) value += __shfl_xor_sync(0xFFFFFFFFu, value, delta);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = value;
  __syncthreads();
  unsigned long long result = 0;
  for (int w = 0; w < kQuantizeWarps; ++w) result += shared[w];
  __syncthreads();
  return result;
}

template <int Bits, bool Stochastic>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_pack_kernel(const float* buffer, const QuantizeLayer* layers, QuantizePlan plan, uint8_t* message) {
  __shared__ uint32_t max_shared[kQuantizeWarps];
  __shared__ unsigned long long sum_shared[kQuantizeWarps];
  for (int64_t tile = blockIdx.x; tile < plan.total_tiles; tile += gridDim.x) {
    const QuantizeLayer layer = layers[find_tile_layer(layers, plan.n_layers, tile)];
    const int64_t c = tile - layer.first_tile;
    const int64_t start = c * plan.chunk;
    const int64_t rest = layer.numel - start;
    const int64_t n = rest < plan.chunk ? rest : plan.chunk;
    const float* x = buffer + layer.offset + start;
    if (Bits == 32) {
      uint32_t* words = reinterpret_cast<uint32_t*>(message + layer.code_offset) + start;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) words[i] = format::bits_of(x[i]);
      continue;
    }
    uint32_t largest = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t magnitude = format::bits_of(x[i]) & 0x7FFFFFFFu;
      largest = magnitude > largest ? magnitude : largest;
    }
    const float top = quantize::chunk_max_from_bits(block_max(largest, max_shared));
    const int32_t level = Bits == 1 ? 0 : quantize::levels(Bits);
    const float factor = Bits == 1 ? quantize::sign_unit(top) : quantize::quantize_inverse(top, level);
    constexpr int kPerByte = Bits >= 8 ? 1 : 8 / Bits;
    const int64_t n_bytes = (n * Bits + 7) / 8;
    uint8_t* codes = message + layer.code_offset + start / 8 * Bits;
    unsigned long long fixed_sum = 0;
    for (int64_t j = threadIdx.x; j < n_bytes; j += blockDim.x) {
      uint32_t byte = 0;
      for (int k = 0; k < kPerByte; ++k) {
        const int64_t i = j * kPerByte + k;
        if (i >= n) break;
        uint32_t code;
        if (Bits == 1) {
          code = quantize::sign_code(x[i]);
          fixed_sum += static_cast<unsigned long long>(quantize::sign_fixed(x[i], factor));
        } else if (Stochastic) {
          const float u = quantize::uniform_noise(layer.seed, static_cast<uint32_t>(start + i));
          code = quantize::stochastic_code(x[i], factor, level, u);
        } else {
          code = quantize::nearest_code(x[i], factor, level);
        }
        byte |= code << (k * Bits);
      }
      codes[j] = static_cast<uint8_t>(byte);
    }
    float scale = top;
    if (Bits == 1) {
      scale = quantize::sign_scale(static_cast<double>(block_sum(fixed_sum, sum_shared)), top, n);
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(message + layer.scale_offset)[c] = scale;
  }
}

template <int Bits>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_unpack_add_kernel(float* out, const uint8_t* messages, int64_t n_messages, const QuantizeLayer* layers,
                               QuantizePlan plan, float weight) {
  for (int64_t tile = blockIdx.x; tile < plan.total_tiles; tile += gridDim.x) {
    const QuantizeLayer layer = layers[find_tile_layer(layers, plan.n_layers, tile)];
    const int64_t c = tile - layer.first_tile;
    const int64_t start = c * plan.chunk;
    const int64_t rest = layer.numel - start;
    const int64_t n = rest < plan.chunk ? rest : plan.chunk;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t entry = start + i;
      float acc = out[layer.offset + entry];
      for (int64_t m = 0; m < n_messages; ++m) {
        const uint8_t* message = messages + m * plan.message_bytes;
        float value;
        if (Bits == 32) {
          value = reinterpret_cast<const float*>(message + layer.code_offset)[entry];
        } else {
          const float scale = reinterpret_cast<const float*>(message + layer.scale_offset)[c];
          const uint32_t code = quantize::read_code(message + layer.code_offset, entry, Bits);
          if (Bits == 1) {
            value = quantize::decode_sign(code, scale);
          } else {
            value = quantize::decode_value(code, quantize::levels(Bits), quantize::decode_step(scale, quantize::levels(Bits)));
          }
        }
        acc = quantize::accumulate(acc, value, weight);
      }
      out[layer.offset + entry] = acc;
    }
  }
}

}  // namespace (rtc under NVRTC)

// ---------------------------------------------------------------------------------------------
// Launchers (host code; gcomp/native_cupy.py mirrors them launch by launch for NVRTC builds)
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)

namespace {
unsigned int quantize_grid(int64_t tiles) {
  return static_cast<unsigned int>(tiles < 1 ? 1 : (tiles > kQuantizeMaxGridBlocks ? kQuantizeMaxGridBlocks : tiles));
}
}  // namespace

cudaError_t launch_quantize_pack(int32_t bits, bool stochastic, const float* buffer, const QuantizeLayer* layers,
                                 const QuantizePlan& plan, uint8_t* message, cudaStream_t stream) {
  if (plan.n_layers == 0 || plan.total_tiles == 0) return cudaGetLastError();
  const unsigned int grid = quantize_grid(plan.total_tiles);
  switch (bits) {
    case 1:
      quantize_pack_kernel<1, false><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      break;
    case 2:
      if (stochastic) {
        quantize_pack_kernel<2, true><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      } else {
        quantize_pack_kernel<2, false><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      }
      break;
    case 4:
      if (stochastic) {
        quantize_pack_kernel<4, true><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      } else {
        quantize_pack_kernel<4, false><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      }
      break;
    case 8:
      if (stochastic) {
        quantize_pack_kernel<8, true><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      } else {
        quantize_pack_kernel<8, false><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      }
      break;
    default:
      quantize_pack_kernel<32, false><<<grid, kQuantizeThreads, 0, stream>>>(buffer, layers, plan, message);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_unpack_add(int32_t bits, float* out, const uint8_t* messages, int64_t n_messages,
                                       const QuantizeLayer* layers, const QuantizePlan& plan, float weight,
                                       cudaStream_t stream) {
  if (plan.n_layers == 0 || plan.total_tiles == 0 || n_messages == 0) return cudaGetLastError();
  const unsigned int grid = quantize_grid(plan.total_tiles);
  switch (bits) {
    case 1:
      quantize_unpack_add_kernel<1><<<grid, kQuantizeThreads, 0, stream>>>(out, messages, n_messages, layers, plan, weight);
      break;
    case 2:
      quantize_unpack_add_kernel<2><<<grid, kQuantizeThreads, 0, stream>>>(out, messages, n_messages, layers, plan, weight);
      break;
    case 4:
      quantize_unpack_add_kernel<4><<<grid, kQuantizeThreads, 0, stream>>>(out, messages, n_messages, layers, plan, weight);
      break;
    case 8:
      quantize_unpack_add_kernel<8><<<grid, kQuantizeThreads, 0, stream>>>(out, messages, n_messages, layers, plan, weight);
      break;
    default:
      quantize_unpack_add_kernel<32><<<grid, kQuantizeThreads, 0, stream>>>(out, messages, n_messages, layers, plan, weight);
      break;
  }
  return cudaGetLastError();
}

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace gcomp
