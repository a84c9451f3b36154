// Host-side argument checks and the bucket layout shared by the CPU and CUDA bindings of the
// sparse ops. Every check raises ValueError (c10::ValueError) before any kernel runs, so a bad
// call never touches memory it should not.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "gcomp/sparse_format.h"

namespace gcomp {

// A bucket's layers and where each one's section sits in the message.
struct BucketLayout {
  std::vector<int64_t> offsets;  // first element of each layer in the flat buffer
  std::vector<int64_t> numels;
  std::vector<int64_t> ks;
  std::vector<int64_t> entry_base;  // prefix sums of ks, size L + 1
  std::vector<format::LayerSection> sections;
  format::FloatKind value_kind = format::FloatKind::kFloat32;
  int64_t message_bytes = 0;

  int64_t n_layers() const { return static_cast<int64_t>(numels.size()); }
  int64_t total_entries() const { return entry_base.back(); }
};

inline format::FloatKind float_kind_of(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return format::FloatKind::kFloat32;
    case c10::ScalarType::Half:
      return format::FloatKind::kFloat16;
    case c10::ScalarType::BFloat16:
      return format::FloatKind::kBFloat16;
    case c10::ScalarType::Double:
      return format::FloatKind::kFloat64;
    default:
      TORCH_CHECK_VALUE(false, "gcomp: unsupported floating dtype ", dtype);
  }
}

inline bool is_value_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Half ||
         dtype == c10::ScalarType::BFloat16;
}

inline bool is_buffer_dtype(c10::ScalarType dtype) {
  return is_value_dtype(dtype) || dtype == c10::ScalarType::Double;
}

// Validates the per-layer description against a flat tensor of `extent` elements and computes
// the message layout. Mirrors gcomp.compress.sparse.sparse_message_layout.
inline BucketLayout make_bucket_layout(const char* op, c10::IntArrayRef offsets,
                                       c10::IntArrayRef numels, c10::IntArrayRef ks,
                                       c10::ScalarType value_dtype, int64_t extent) {
  TORCH_CHECK_VALUE(offsets.size() == numels.size() && numels.size() == ks.size(), op,
                    ": offsets, numels and ks must have the same length (got ", offsets.size(), ", ",
                    numels.size(), ", ", ks.size(), ")");
  TORCH_CHECK_VALUE(is_value_dtype(value_dtype), op,
                    ": value_dtype must be float32, float16 or bfloat16, got ", value_dtype);
  BucketLayout layout;
  layout.value_kind = float_kind_of(value_dtype);
  layout.offsets.assign(offsets.begin(), offsets.end());
  layout.numels.assign(numels.begin(), numels.end());
  layout.ks.assign(ks.begin(), ks.end());
  layout.entry_base.assign(1, 0);
  int64_t cursor = 0;
  for (size_t l = 0; l < numels.size(); ++l) {
    const int64_t offset = offsets[l], numel = numels[l], k = ks[l];
    TORCH_CHECK_VALUE(numel >= 1 && numel <= format::kMaxLayerNumel, op, ": layer ", l,
                      " has numel ", numel, ", expected 1 <= numel <= 2^",
                      format::kMaxIndexBits);
    TORCH_CHECK_VALUE(k >= 1 && k <= numel, op, ": layer ", l, " has k = ", k,
                      ", expected 1 <= k <= numel = ", numel);
    TORCH_CHECK_VALUE(offset >= 0 && offset <= extent && numel <= extent - offset, op, ": layer ",
                      l, " spans [", offset, ", ", offset, " + ", numel,
                      ") which is outside the tensor of ", extent, " elements");
    const format::LayerSection section =
        format::layer_section(cursor, numel, k, layout.value_kind);
    layout.sections.push_back(section);
    cursor = format::layer_section_end(section);
    layout.entry_base.push_back(layout.entry_base.back() + k);
  }
  layout.message_bytes = cursor;
  return layout;
}

// Unpacking adds into the layers in parallel, so two layers sharing an element would race.
inline void check_layers_disjoint(const char* op, const BucketLayout& layout) {
  std::vector<int64_t> order(layout.numels.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return layout.offsets[a] < layout.offsets[b]; });
  for (size_t i = 1; i < order.size(); ++i) {
    const int64_t prev = order[i - 1], next = order[i];
    TORCH_CHECK_VALUE(layout.offsets[prev] + layout.numels[prev] <= layout.offsets[next], op,
                      ": layers ", prev, " and ", next, " overlap");
  }
}

inline void check_pack_args(const char* op, const at::Tensor& buffer) {
  TORCH_CHECK_VALUE(is_buffer_dtype(buffer.scalar_type()), op,
                    ": buffer must be float32, float64, float16 or bfloat16, got ",
                    buffer.scalar_type());
  TORCH_CHECK_VALUE(buffer.dim() == 1, op, ": buffer must be 1-D, got ", buffer.dim(), "-D");
  TORCH_CHECK_VALUE(buffer.is_contiguous(), op, ": buffer must be contiguous");
}

// Returns the number of messages (rows) after checking dtype, rank and row size.
inline int64_t check_messages(const char* op, const at::Tensor& messages,
                              const BucketLayout& layout) {
  TORCH_CHECK_VALUE(messages.scalar_type() == c10::ScalarType::Byte, op,
                    ": messages must be uint8, got ", messages.scalar_type());
  TORCH_CHECK_VALUE(messages.dim() == 1 || messages.dim() == 2, op,
                    ": messages must be 1-D (one message) or 2-D (one message per row), got ",
                    messages.dim(), "-D");
  const int64_t row_bytes = messages.size(-1);
  TORCH_CHECK_VALUE(row_bytes == layout.message_bytes, op, ": a message has ", row_bytes,
                    " bytes but the layout needs ", layout.message_bytes,
                    " (truncated message or different offsets/numels/ks/value_dtype?)");
  return messages.dim() == 1 ? 1 : messages.size(0);
}

inline void check_unpack_out(const char* op, const at::Tensor& out, const at::Tensor& messages) {
  TORCH_CHECK_VALUE(is_buffer_dtype(out.scalar_type()), op,
                    ": out must be float32, float64, float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(out.device() == messages.device(), op, ": out is on ", out.device(),
                    " but messages are on ", messages.device());
}

// Decoding failures found by the kernels, reported after they finish.
enum DecodeError : int32_t {
  kDecodeOk = 0,
  kIndexOutOfRange = 1,
  kIndexNotIncreasing = 2,
  kBitmapBitBeyondNumel = 3,
  kBitmapCountMismatch = 4,
};

inline const char* describe_decode_error(int32_t code) {
  switch (code) {
    case kIndexOutOfRange:
      return "a bit-packed index is >= numel";
    case kIndexNotIncreasing:
      return "bit-packed indices are not strictly increasing";
    case kBitmapBitBeyondNumel:
      return "the bitmap has a bit set at a position >= numel";
    case kBitmapCountMismatch:
      return "the bitmap's popcount differs from k";
    default:
      return "unknown decoding error";
  }
}

[[noreturn]] inline void raise_decode_error(const char* op, int64_t message, int64_t layer,
                                            int32_t code) {
  TORCH_CHECK_VALUE(false, op, ": message ", message, ", layer ", layer, ": ",
                    describe_decode_error(code), " (corrupted or mismatched message)");
  __builtin_unreachable();
}

}  // namespace gcomp
