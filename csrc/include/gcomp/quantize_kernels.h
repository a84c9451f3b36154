// Raw-pointer CUDA launchers of the quantized message ops (implemented in csrc/quantize_kernels.cu).
//
// No torch header here: the kernels compile with plain nvcc (and NVRTC, for gcomp/native_cupy.py).
// The torch glue (csrc/quantize_ops_cuda.cu) checks arguments, computes the layout on the host,
// allocates a zero-filled message (padding bytes stay zero) and hands these launchers device
// pointers. Every launcher is asynchronous on `stream` and returns the launch status.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#endif

#include "gcomp/quantize_format.h"

namespace gcomp {
namespace cuda {

// One layer of a bucket as the quantize kernels see it (an array of these lives in device memory).
// A "tile" is one chunk of `chunk` entries (the last one of a layer may be shorter); for 32 bits,
// which has no scales, tiles only split the copying work.
struct QuantizeLayer {
  int64_t offset;        // first element in the buffer / out
  int64_t numel;
  int64_t first_tile;    // index of the layer's first tile over the bucket
  int64_t scale_offset;  // byte offsets inside one message
  int64_t code_offset;
  uint32_t seed;         // stochastic rounding seed (mod 2^32)
  int32_t reserved;      // zero; keeps the struct 8-byte aligned (48 bytes)
};

// Passed by value to every quantize kernel.
struct QuantizePlan {
  int64_t n_layers;
  int64_t total_tiles;
  int64_t chunk;
  int64_t message_bytes;
};

#if !defined(__CUDACC_RTC__)

// Writes the scales and codes of every layer into `message`, which must be zero-filled and hold
// the whole layout. `stochastic` applies to 2, 4 and 8 bits only (seeds in `layers`).
cudaError_t launch_quantize_pack(int32_t bits, bool stochastic, const float* buffer, const QuantizeLayer* layers,
                                 const QuantizePlan& plan, uint8_t* message, cudaStream_t stream);

// out[layer] += weight * decode(message m) for m = 0, 1, ..., n_messages - 1 in that order, per
// entry (one thread adds every message to its entries: the fixed summation order).
cudaError_t launch_quantize_unpack_add(int32_t bits, float* out, const uint8_t* messages, int64_t n_messages,
                                       const QuantizeLayer* layers, const QuantizePlan& plan, float weight,
                                       cudaStream_t stream);

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace gcomp
