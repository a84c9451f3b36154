// CUDA bindings of the sparse message ops: torch glue only (checks, allocation, layout, launch).
// (Not named sparse_ops.cu: its object file would collide with sparse_ops.cpp's in the build.)
// The kernels are raw-pointer code in sparse_kernels.cu; the op schemas, CPU kernels and meta
// functions are in sparse_ops.cpp. Built only into a CUDAExtension (GCOMP_WITH_CUDA).
#ifdef GCOMP_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "gcomp/sparse_kernels.h"
#include "gcomp/sparse_layout_host.h"

namespace gcomp {
namespace {

// Copies plain descriptor structs to the device (synchronously: the host vector dies here).
template <class T>
at::Tensor upload(const std::vector<T>& items, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(items.size() * sizeof(T))}, at::kByte);
  if (!items.empty()) std::memcpy(host.data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device);
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK_VALUE(blocks < std::numeric_limits<int32_t>::max(), op, ": bucket too large for one launch");
}

at::Tensor topk_pack_cuda(const at::Tensor& buffer, c10::IntArrayRef offsets, c10::IntArrayRef numels,
                          c10::IntArrayRef ks, c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.topk_pack";
  check_pack_args(op, buffer);
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype, buffer.numel());
  const c10::cuda::CUDAGuard guard(buffer.device());
  at::Tensor message = at::zeros({layout.message_bytes}, buffer.options().dtype(at::kByte));
  std::vector<cuda::PackLayer> layers;
  int64_t tiles = 0, index_items = 0;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    const format::LayerSection& section = layout.sections[l];
    layers.push_back({layout.offsets[l], layout.numels[l], layout.ks[l], layout.entry_base[l], tiles,
                      index_items, section});
    tiles += (layout.numels[l] + cuda::kPackTileElements - 1) / cuda::kPackTileElements;
    index_items += section.bitmap ? format::bitmap_bytes(layout.numels[l])
                                  : (layout.ks[l] + format::kIndexGroup - 1) / format::kIndexGroup;
  }
  check_grid(op, tiles);
  const cuda::PackPlan plan{layout.n_layers(), tiles, layout.total_entries(), index_items};
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::topk_pack_workspace_bytes(plan))},
                                   buffer.options().dtype(at::kByte));
  const at::Tensor device_layers = upload(layers, buffer.device());
  C10_CUDA_CHECK(cuda::launch_topk_pack(float_kind_of(buffer.scalar_type()), buffer.const_data_ptr(),
                                        reinterpret_cast<const cuda::PackLayer*>(device_layers.const_data_ptr()),
                                        plan, layout.value_kind, message.data_ptr<uint8_t>(),
                                        workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return message;
}

// Everything the unpack launchers need, kept alive until the caller's work is queued.
struct DecodedMessages {
  at::Tensor messages;
  at::Tensor device_layers;
  at::Tensor indices;  // layer-relative, n_messages x total_entries
  cuda::DecodePlan plan;
};

// Validates and decodes on the device, then raises on the host if any message was malformed. The
// status read-back synchronises with the stream: out is untouched unless every message is valid.
DecodedMessages decode_on_device(const char* op, const at::Tensor& messages_in, const BucketLayout& layout,
                                 int64_t n_messages) {
  TORCH_CHECK_VALUE(n_messages <= 65535, op, ": at most 65535 messages per call");
  DecodedMessages decoded;
  decoded.messages = messages_in.contiguous();
  std::vector<cuda::UnpackLayer> layers;
  int64_t groups = 0, bitmap_tiles = 0;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    const format::LayerSection& section = layout.sections[l];
    layers.push_back({layout.offsets[l], layout.numels[l], layout.ks[l], layout.entry_base[l], groups,
                      bitmap_tiles, section});
    if (section.bitmap) {
      bitmap_tiles += (format::bitmap_bytes(layout.numels[l]) + cuda::kBitmapTileBytes - 1) / cuda::kBitmapTileBytes;
    } else {
      groups += (layout.ks[l] + format::kIndexGroup - 1) / format::kIndexGroup;
    }
  }
  check_grid(op, bitmap_tiles);
  decoded.plan = {n_messages, layout.n_layers(), layout.message_bytes, layout.total_entries(), groups, bitmap_tiles};
  const at::TensorOptions bytes = decoded.messages.options();
  decoded.device_layers = upload(layers, decoded.messages.device());
  decoded.indices = at::empty({n_messages * layout.total_entries()}, bytes.dtype(at::kLong));
  at::Tensor status = at::full({1}, -1, bytes.dtype(at::kLong));  // all ones: kNoDecodeFailure
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(cuda::decode_workspace_bytes(decoded.plan))}, bytes.dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_decode(
      decoded.messages.const_data_ptr<uint8_t>(),
      reinterpret_cast<const cuda::UnpackLayer*>(decoded.device_layers.const_data_ptr()), decoded.plan,
      decoded.indices.data_ptr<int64_t>(), reinterpret_cast<cuda::DecodeStatus*>(status.data_ptr()),
      workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  const auto failure = static_cast<unsigned long long>(status.cpu().item<int64_t>());
  if (failure != cuda::kNoDecodeFailure) {
    const int64_t location = static_cast<int64_t>(failure / 8);
    raise_decode_error(op, location / layout.n_layers(), location % layout.n_layers(),
                       static_cast<int32_t>(failure % 8));
  }
  return decoded;
}

void sparse_unpack_add_cuda(const at::Tensor& out, const at::Tensor& messages, c10::IntArrayRef offsets,
                            c10::IntArrayRef numels, c10::IntArrayRef ks, c10::ScalarType value_dtype,
                            double scale) {
  constexpr const char* op = "gcomp.sparse_unpack_add_";
  check_unpack_out(op, out, messages);
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype, out.numel());
  check_layers_disjoint(op, layout);
  const int64_t n_messages = check_messages(op, messages, layout);
  if (n_messages == 0 || layout.n_layers() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const DecodedMessages decoded = decode_on_device(op, messages, layout, n_messages);
  for (int64_t m = 0; m < n_messages; ++m) {  // one launch per message: the fixed summation order
    C10_CUDA_CHECK(cuda::launch_add_message(
        float_kind_of(out.scalar_type()), out.data_ptr(), decoded.messages.const_data_ptr<uint8_t>(),
        reinterpret_cast<const cuda::UnpackLayer*>(decoded.device_layers.const_data_ptr()), decoded.plan,
        layout.value_kind, decoded.indices.const_data_ptr<int64_t>(), m, scale,
        c10::cuda::getCurrentCUDAStream()));
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_unpack_cuda(const at::Tensor& messages, c10::IntArrayRef offsets,
                                                      c10::IntArrayRef numels, c10::IntArrayRef ks,
                                                      c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.sparse_unpack";
  const BucketLayout layout =
      make_bucket_layout(op, offsets, numels, ks, value_dtype, std::numeric_limits<int64_t>::max());
  const int64_t n_messages = check_messages(op, messages, layout);
  const c10::cuda::CUDAGuard guard(messages.device());  // before any allocation or stream query
  std::vector<int64_t> shape = {n_messages, layout.total_entries()};
  if (messages.dim() == 1) shape.erase(shape.begin());
  at::Tensor values = at::empty(shape, messages.options().dtype(value_dtype));
  at::Tensor indices = at::empty(shape, messages.options().dtype(at::kLong));
  if (n_messages == 0 || layout.total_entries() == 0) return {values, indices};
  const DecodedMessages decoded = decode_on_device(op, messages, layout, n_messages);
  C10_CUDA_CHECK(cuda::launch_gather_entries(
      decoded.messages.const_data_ptr<uint8_t>(),
      reinterpret_cast<const cuda::UnpackLayer*>(decoded.device_layers.const_data_ptr()), decoded.plan,
      layout.value_kind, decoded.indices.const_data_ptr<int64_t>(), static_cast<uint8_t*>(values.data_ptr()),
      indices.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(gcomp, CUDA, m) {
  m.impl("topk_pack", &topk_pack_cuda);
  m.impl("sparse_unpack_add_", &sparse_unpack_add_cuda);
  m.impl("sparse_unpack", &sparse_unpack_cuda);
}

}  // namespace gcomp

#endif  // GCOMP_WITH_CUDA
