// Raw-pointer CUDA launchers of the sparse message ops (implemented in csrc/sparse_kernels.cu).
//
// No torch header here: the kernels compile with plain nvcc, and the torch glue
// (csrc/sparse_ops.cu) does argument checks, allocation and the layout on the host, then hands
// these launchers device pointers. Every launcher is asynchronous on `stream` and returns the
// launch status.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#endif

#include "gcomp/sparse_format.h"

namespace gcomp {
namespace cuda {

// Elements handled by one block in the pack kernels.
constexpr int64_t kPackTileElements = 4096;
// Bitmap bytes handled by one block when decoding (256 threads x 8 bytes).
constexpr int64_t kBitmapTileBytes = 2048;

// One layer of a bucket as the pack kernels see it (an array of these lives in device memory).
struct PackLayer {
  int64_t offset;      // first element in the buffer
  int64_t numel;
  int64_t k;
  int64_t entry_base;  // first entry of this layer in the bucket's selected-index scratch
  int64_t first_tile;  // first pack tile (kPackTileElements elements) of this layer
  int64_t first_index_item;  // first index-encoding item: a group of 8 indices or a bitmap byte
  format::LayerSection section;
};

// One layer of a bucket as the decode/unpack kernels see it.
struct UnpackLayer {
  int64_t offset;
  int64_t numel;
  int64_t k;
  int64_t entry_base;         // first entry of this layer in a decoded row
  int64_t first_group;        // bit-packed layers: first group of 8 indices over such layers
  int64_t first_bitmap_tile;  // bitmap layers: first tile of kBitmapTileBytes over such layers
  format::LayerSection section;
};

// Filled by the decode kernels; read back by the host to raise a precise error. Holds the minimum
// over failures of (message * n_layers + layer) * 8 + error code, or ~0 if nothing failed.
struct DecodeStatus {
  unsigned long long first_failure;
};
constexpr unsigned long long kNoDecodeFailure = ~0ull;

// ---- topk_pack ----

struct PackPlan {
  int64_t n_layers;
  int64_t total_tiles;
  int64_t total_entries;
  int64_t total_index_items;
};

// ---- decoding ----

struct DecodePlan {
  int64_t n_messages;
  int64_t n_layers;
  int64_t message_bytes;
  int64_t total_entries;
  int64_t total_groups;        // over bit-packed layers
  int64_t total_bitmap_tiles;  // over bitmap layers
};

// ---- launchers (host code: not part of a run-time (NVRTC) compilation, which takes the kernels
// from sparse_kernels.cu and launches them from Python, see gcomp/native_cupy.py) ----
#if !defined(__CUDACC_RTC__)

size_t topk_pack_workspace_bytes(const PackPlan& plan);

// `message` must be zero-filled and hold the whole layout; `layers` is a device array.
cudaError_t launch_topk_pack(format::FloatKind input_kind, const void* buffer,
                             const PackLayer* layers, const PackPlan& plan,
                             format::FloatKind value_kind, uint8_t* message, void* workspace,
                             cudaStream_t stream);

size_t decode_workspace_bytes(const DecodePlan& plan);

// Validates every message and writes layer-relative indices to `indices` (n_messages rows of
// total_entries). `status` must start as {kNoDecodeFailure}. Entries of a layer that failed
// validation are unspecified, but nothing is written outside `indices`.
cudaError_t launch_decode(const uint8_t* messages, const UnpackLayer* layers, const DecodePlan& plan,
                          int64_t* indices, DecodeStatus* status, void* workspace,
                          cudaStream_t stream);

// out[offset + index] += scale * value for every entry of message `message` (call in order
// 0, 1, 2, ... for rank-independent sums). Only after a decode that reported no error.
cudaError_t launch_add_message(format::FloatKind out_kind, void* out, const uint8_t* messages,
                               const UnpackLayer* layers, const DecodePlan& plan,
                               format::FloatKind value_kind, const int64_t* indices,
                               int64_t message, double scale, cudaStream_t stream);

// Values (value dtype, layer by layer) and absolute indices of every message, from a decode.
cudaError_t launch_gather_entries(const uint8_t* messages, const UnpackLayer* layers,
                                  const DecodePlan& plan, format::FloatKind value_kind,
                                  const int64_t* decoded, uint8_t* values, int64_t* indices,
                                  cudaStream_t stream);

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace gcomp
