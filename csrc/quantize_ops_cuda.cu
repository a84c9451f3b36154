// CUDA bindings of the quantized message ops: torch glue only (checks, allocation, layout, launch).
// (Not named quantize_ops.cu: its object file would collide with quantize_ops.cpp's in the build.)
// The kernels are raw-pointer code in quantize_kernels.cu; the op schemas, CPU kernels and meta
// functions are in quantize_ops.cpp. Built only into a CUDAExtension (GCOMP_WITH_CUDA).
#ifdef GCOMP_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gcomp/quantize_kernels.h"
#include "gcomp/quantize_layout_host.h"

namespace gcomp {
namespace {

// The QuantizeLayer array (on the device) and the plan of a bucket: one tile per chunk.
struct QuantizeDescriptors {
  at::Tensor device_layers;
  cuda::QuantizePlan plan;
};

QuantizeDescriptors describe_quantize(const QuantizeLayout& layout, const c10::optional<c10::IntArrayRef>& seeds,
                                      const at::Device& device) {
  std::vector<cuda::QuantizeLayer> layers;
  int64_t tiles = 0;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    const uint32_t seed = seeds.has_value() ? static_cast<uint32_t>(static_cast<uint64_t>((*seeds)[l])) : 0u;
    layers.push_back({layout.offsets[l], layout.numels[l], tiles, layout.scale_offset[l], layout.code_offset[l], seed, 0});
    tiles += (layout.numels[l] + layout.chunk - 1) / layout.chunk;
  }
  // Copied synchronously: the host vector dies here.
  at::Tensor host = at::empty({static_cast<int64_t>(layers.size() * sizeof(cuda::QuantizeLayer))}, at::kByte);
  if (!layers.empty()) std::memcpy(host.data_ptr(), layers.data(), layers.size() * sizeof(cuda::QuantizeLayer));
  return {host.to(device), cuda::QuantizePlan{layout.n_layers(), tiles, layout.chunk, layout.message_bytes}};
}

at::Tensor quantize_pack_cuda(const at::Tensor& buffer, c10::IntArrayRef offsets, c10::IntArrayRef numels, int64_t bits,
                              int64_t chunk, c10::optional<c10::IntArrayRef> seeds) {
  constexpr const char* op = "gcomp.quantize_pack";
  check_quantize_buffer(op, buffer, "buffer");
  const QuantizeLayout layout = make_quantize_layout(op, offsets, numels, bits, chunk, buffer.numel());
  check_quantize_seeds(op, seeds, layout.n_layers());
  const c10::cuda::CUDAGuard guard(buffer.device());  // before any allocation or stream query
  at::Tensor message = at::zeros({layout.message_bytes}, buffer.options().dtype(at::kByte));  // padding stays zero
  if (layout.n_layers() == 0) return message;
  const QuantizeDescriptors descriptors = describe_quantize(layout, seeds, buffer.device());
  const bool stochastic = seeds.has_value() && bits != 1 && bits != 32;
  C10_CUDA_CHECK(cuda::launch_quantize_pack(
      static_cast<int32_t>(bits), stochastic, buffer.const_data_ptr<float>(),
      reinterpret_cast<const cuda::QuantizeLayer*>(descriptors.device_layers.const_data_ptr()), descriptors.plan,
      message.data_ptr<uint8_t>(), c10::cuda::getCurrentCUDAStream()));
  return message;
}

void quantize_unpack_add_cuda(const at::Tensor& out, const at::Tensor& messages_in, c10::IntArrayRef offsets,
                              c10::IntArrayRef numels, int64_t bits, int64_t chunk, double weight) {
  constexpr const char* op = "gcomp.quantize_unpack_add_";
  check_quantize_buffer(op, out, "out");
  const QuantizeLayout layout = make_quantize_layout(op, offsets, numels, bits, chunk, out.numel());
  const int64_t n_messages = check_quantize_messages(op, messages_in, layout);
  TORCH_CHECK_VALUE(messages_in.device() == out.device(), op, ": out is on ", out.device(), " but messages are on ",
                    messages_in.device());
  check_quantize_layers_disjoint(op, layout);
  if (n_messages == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // The kernels read scales (and 32-bit codes) as aligned floats: a view starting at an odd byte
  // is copied to fresh (aligned) memory first.
  at::Tensor messages = messages_in.contiguous();
  if (reinterpret_cast<uintptr_t>(messages.const_data_ptr()) % 8 != 0) messages = messages.clone();
  const QuantizeDescriptors descriptors = describe_quantize(layout, c10::nullopt, out.device());
  C10_CUDA_CHECK(cuda::launch_quantize_unpack_add(
      static_cast<int32_t>(bits), out.data_ptr<float>(), messages.const_data_ptr<uint8_t>(), n_messages,
      reinterpret_cast<const cuda::QuantizeLayer*>(descriptors.device_layers.const_data_ptr()), descriptors.plan,
      static_cast<float>(weight), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(gcomp, CUDA, m) {
  m.impl("quantize_pack", &quantize_pack_cuda);
  m.impl("quantize_unpack_add_", &quantize_unpack_add_cuda);
}

}  // namespace gcomp

#endif  // GCOMP_WITH_CUDA
