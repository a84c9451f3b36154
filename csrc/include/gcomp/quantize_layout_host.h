// Host-side layout and argument checks of the quantized message ops, shared by the CPU kernels
// (quantize_ops.cpp) and the CUDA glue (quantize_ops_cuda.cu). Uses torch's error macros, so
// a bad argument raises ValueError in Python, with the same wording on every device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "gcomp/quantize_format.h"

namespace gcomp {

// Where each layer of a bucket sits in the buffer and in its quantized message.
struct QuantizeLayout {
  int32_t bits = 0;
  int64_t chunk = 0;
  std::vector<int64_t> offsets;       // first element of each layer in the buffer
  std::vector<int64_t> numels;
  std::vector<int64_t> chunks;        // scales per layer (0 for 32 bits)
  std::vector<int64_t> scale_offset;  // byte offsets inside one message
  std::vector<int64_t> code_offset;
  std::vector<int64_t> code_bytes;    // padded
  int64_t message_bytes = 0;

  int64_t n_layers() const { return static_cast<int64_t>(numels.size()); }
  int64_t total_numel() const { return std::accumulate(numels.begin(), numels.end(), int64_t(0)); }
};

inline void check_quantize_arguments(const char* op, int64_t bits, int64_t chunk) {
  TORCH_CHECK_VALUE(quantize::valid_bits(bits), op, ": bits must be one of [1, 2, 4, 8, 32]; got ", bits);
  TORCH_CHECK_VALUE(quantize::valid_chunk(chunk), op,
                    ": chunk must be a multiple of 8 in [8, 2^24] (entries sharing one scale); got ", chunk);
}

// Checks the arguments (layers inside a tensor of `extent` elements) and computes the layout.
inline QuantizeLayout make_quantize_layout(const char* op, c10::IntArrayRef offsets, c10::IntArrayRef numels,
                                           int64_t bits, int64_t chunk, int64_t extent) {
  TORCH_CHECK_VALUE(offsets.size() == numels.size(), op, ": offsets and numels must have the same length (got ",
                    offsets.size(), ", ", numels.size(), ")");
  check_quantize_arguments(op, bits, chunk);
  QuantizeLayout layout;
  layout.bits = static_cast<int32_t>(bits);
  layout.chunk = chunk;
  int64_t cursor = 0;
  for (size_t l = 0; l < numels.size(); ++l) {
    const int64_t numel = numels[l], offset = offsets[l];
    TORCH_CHECK_VALUE(numel >= 1 && numel <= quantize::kMaxLayerNumel, op, ": layer ", l, " has numel ", numel,
                      ", expected 1 <= numel < 2^32");
    TORCH_CHECK_VALUE(offset >= 0 && offset <= extent - numel, op, ": layer [", offset, ", ", offset + numel,
                      ") lies outside the buffer of ", extent, " entries");
    layout.offsets.push_back(offset);
    layout.numels.push_back(numel);
    layout.chunks.push_back(quantize::chunk_count(numel, bits, chunk));
    layout.scale_offset.push_back(cursor);
    cursor += quantize::scale_section_bytes(numel, bits, chunk);
    layout.code_offset.push_back(cursor);
    layout.code_bytes.push_back(quantize::code_section_bytes(numel, bits));
    cursor += layout.code_bytes.back();
  }
  layout.message_bytes = cursor;
  return layout;
}

inline void check_quantize_buffer(const char* op, const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.scalar_type() == at::kFloat && tensor.dim() == 1 && tensor.is_contiguous(), op,
                    ": expected ", name, " to be a contiguous 1-D float32 tensor; got ", tensor.scalar_type(),
                    " of shape ", tensor.sizes());
}

inline void check_quantize_seeds(const char* op, const c10::optional<c10::IntArrayRef>& seeds, int64_t n_layers) {
  if (seeds.has_value()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(seeds->size()) == n_layers, op, ": one seed per layer expected (",
                      n_layers, "); got ", seeds->size());
  }
}

// Layers that overlap in `out` would make the order of the additions depend on the kernel.
inline void check_quantize_layers_disjoint(const char* op, const QuantizeLayout& layout) {
  std::vector<int64_t> order(layout.numels.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return layout.offsets[a] < layout.offsets[b]; });
  for (size_t i = 1; i < order.size(); ++i) {
    const int64_t prev = order[i - 1], next = order[i];
    TORCH_CHECK_VALUE(layout.offsets[prev] + layout.numels[prev] <= layout.offsets[next], op, ": layers ", prev,
                      " and ", next, " overlap in out");
  }
}

// Returns the number of messages in `messages` (uint8, any shape, whole messages back to back).
inline int64_t check_quantize_messages(const char* op, const at::Tensor& messages, const QuantizeLayout& layout) {
  const int64_t bytes = messages.numel();
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kByte && layout.message_bytes > 0 &&
                        bytes % layout.message_bytes == 0,
                    op, ": messages must be uint8 holding whole messages of ", layout.message_bytes,
                    " bytes; got ", messages.scalar_type(), " with ", bytes, " bytes");
  return bytes / layout.message_bytes;
}

}  // namespace gcomp
