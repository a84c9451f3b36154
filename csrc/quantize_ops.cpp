// CPU kernels of the quantized message ops (quantize_pack, quantize_unpack_add_), their torch op
// definitions and meta (fake) implementations. The byte-level format and the per-entry math are
// in gcomp/quantize_format.h; the pure-torch twin that must give identical bytes and sums is
// gcomp/compress/quantize.py (its docstring is the specification).
//
// Parallel structure: every layer is cut into work units of whole chunks (about kUnitElements
// entries), handed to OpenMP threads. A unit writes its own scales and code bytes (chunks start on
// byte boundaries, as chunk is a multiple of 8) and, when unpacking, its own entries of `out`,
// to which it adds message 0, 1, 2, ... in that order. So the result never depends on the thread
// count.
//
// Vectorisation: the kernels are plain loops over blocks of 64 entries (fixed trip counts, no
// branches, integer reductions), written for the compiler's vectoriser. Each SIMD level
// (GCOMP_SIMD, shared with the sparse kernels) compiles the same inline body with a function
// target attribute (AVX-512, AVX2, or the baseline), so the build needs no -m flags. The same
// IEEE operations run at every level (-ffp-contract=off: nothing fused), hence the same bits.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gcomp/quantize_cpu_kernels.h"
#include "gcomp/quantize_format.h"
#include "gcomp/quantize_layout_host.h"

namespace gcomp {

// The SIMD level the kernels run at now (0 portable, 1 AVX2, 2 AVX-512): GCOMP_SIMD, else the best
// the CPU supports. Defined in sparse_ops.cpp, so both op families obey one switch.
int current_simd_level();

namespace {

using quantize_cpu::PackEntry;
using quantize_cpu::PackTask;
using quantize_cpu::UnpackEntry;
using quantize_cpu::UnpackTask;

// Entries per work unit (rounded to whole chunks): big enough to amortise scheduling, small
// enough to balance two threads on a few layers.
constexpr int64_t kUnitElements = int64_t(1) << 15;
// Entries worth waking another thread for (every parallel region ends in a barrier).
constexpr int64_t kWorkPerThread = int64_t(1) << 17;

int thread_count(int64_t work) {
  const int64_t useful = std::max<int64_t>(1, work / kWorkPerThread);
  return static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), useful));
}

// A message of tens of MB comes from a fresh mapping on every call (glibc maps blocks above 32 MB
// itself and unmaps them on free), and the kernels' first touch then faults it in 4 KiB pages: at
// 64M entries and 8 bits that cost more than the copy of the buffer. Transparent huge pages fault
// it in 2 MiB at a time. Advice only: where the kernel declines, nothing changes.
constexpr int64_t kHugePageAdviceBytes = int64_t(8) << 20;

void advise_huge_pages(uint8_t* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageAdviceBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A run of whole chunks of one layer: entries [begin, end) of layer `layer`.
struct Unit {
  int64_t layer;
  int64_t begin;
  int64_t end;
};

std::vector<Unit> make_units(const QuantizeLayout& layout) {
  const int64_t per_unit = std::max<int64_t>(1, kUnitElements / layout.chunk) * layout.chunk;
  std::vector<Unit> units;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t begin = 0; begin < layout.numels[l]; begin += per_unit) {
      units.push_back({l, begin, std::min(layout.numels[l], begin + per_unit)});
    }
  }
  return units;
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

at::Tensor quantize_pack_cpu(const at::Tensor& buffer, c10::IntArrayRef offsets, c10::IntArrayRef numels, int64_t bits,
                             int64_t chunk, c10::optional<c10::IntArrayRef> seeds) {
  constexpr const char* op = "gcomp.quantize_pack";
  check_quantize_buffer(op, buffer, "buffer");
  const QuantizeLayout layout = make_quantize_layout(op, offsets, numels, bits, chunk, buffer.numel());
  check_quantize_seeds(op, seeds, layout.n_layers());
  const PackEntry entry = quantize_cpu::pack_entry(current_simd_level());
  // Not cleared: the kernels write every code byte up to the last entry, and the padding of each
  // section is cleared here.
  at::Tensor message = at::empty({layout.message_bytes}, buffer.options().dtype(at::kByte));
  uint8_t* base = message.data_ptr<uint8_t>();
  advise_huge_pages(base, layout.message_bytes);
  const bool stochastic = seeds.has_value() && bits != 1 && bits != 32;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    const int64_t scale_used = 4 * layout.chunks[l];
    std::memset(base + layout.scale_offset[l] + scale_used, 0,
                static_cast<size_t>(layout.code_offset[l] - layout.scale_offset[l] - scale_used));
    const int64_t code_used = (layout.numels[l] * bits + 7) / 8;
    std::memset(base + layout.code_offset[l] + code_used, 0, static_cast<size_t>(layout.code_bytes[l] - code_used));
  }
  const std::vector<Unit> units = make_units(layout);
  const float* data = buffer.const_data_ptr<float>();
  const int64_t n_units = static_cast<int64_t>(units.size());
  const int bits_int = static_cast<int>(bits);
#pragma omp parallel for schedule(static) num_threads(thread_count(layout.total_numel()))
  for (int64_t u = 0; u < n_units; ++u) {
    const Unit& unit = units[u];
    const int64_t l = unit.layer;
    const uint32_t seed = stochastic ? static_cast<uint32_t>(static_cast<uint64_t>((*seeds)[l])) : 0u;
    const PackTask task{data + layout.offsets[l], unit.begin, unit.end, chunk, seed, stochastic,
                        base + layout.scale_offset[l], base + layout.code_offset[l]};
    entry(task, bits_int);
  }
  return message;
}

void quantize_unpack_add_cpu(const at::Tensor& out, const at::Tensor& messages_in, c10::IntArrayRef offsets,
                             c10::IntArrayRef numels, int64_t bits, int64_t chunk, double weight) {
  constexpr const char* op = "gcomp.quantize_unpack_add_";
  check_quantize_buffer(op, out, "out");
  const QuantizeLayout layout = make_quantize_layout(op, offsets, numels, bits, chunk, out.numel());
  const int64_t n_messages = check_quantize_messages(op, messages_in, layout);
  TORCH_CHECK_VALUE(messages_in.device() == out.device(), op, ": out is on ", out.device(), " but messages are on ",
                    messages_in.device());
  check_quantize_layers_disjoint(op, layout);
  if (n_messages == 0) return;
  const UnpackEntry entry = quantize_cpu::unpack_entry(current_simd_level());
  const at::Tensor messages = messages_in.contiguous();
  const uint8_t* bytes = messages.const_data_ptr<uint8_t>();
  float* data = out.data_ptr<float>();
  const std::vector<Unit> units = make_units(layout);
  const int64_t n_units = static_cast<int64_t>(units.size());
  const float weight_float = static_cast<float>(weight);  // what torch does with a Python float scalar
  const int bits_int = static_cast<int>(bits);
#pragma omp parallel for schedule(static) num_threads(thread_count(layout.total_numel() * n_messages))
  for (int64_t u = 0; u < n_units; ++u) {
    const Unit& unit = units[u];
    const int64_t l = unit.layer;
    const UnpackTask task{data + layout.offsets[l],  unit.begin,         unit.end,
                          chunk,                     bytes,              n_messages,
                          layout.message_bytes,      layout.scale_offset[l], layout.code_offset[l],
                          weight_float};
    entry(task, bits_int);
  }
}

// ---------------------------------------------------------------------------------------------
// Meta (fake) implementations: shapes only, from the int lists (tensor sizes may be symbolic)
// ---------------------------------------------------------------------------------------------

at::Tensor quantize_pack_meta(const at::Tensor& buffer, c10::IntArrayRef offsets, c10::IntArrayRef numels,
                              int64_t bits, int64_t chunk, c10::optional<c10::IntArrayRef> seeds) {
  constexpr const char* op = "gcomp.quantize_pack";
  TORCH_CHECK_VALUE(buffer.scalar_type() == at::kFloat && buffer.dim() == 1, op,
                    ": buffer must be a 1-D float32 tensor");
  const QuantizeLayout layout =
      make_quantize_layout(op, offsets, numels, bits, chunk, std::numeric_limits<int64_t>::max());
  check_quantize_seeds(op, seeds, layout.n_layers());
  return at::empty({layout.message_bytes}, buffer.options().dtype(at::kByte));
}

void quantize_unpack_add_meta(const at::Tensor& out, const at::Tensor& messages, c10::IntArrayRef offsets,
                              c10::IntArrayRef numels, int64_t bits, int64_t chunk, double /*weight*/) {
  constexpr const char* op = "gcomp.quantize_unpack_add_";
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.dim() == 1, op, ": out must be a 1-D float32 tensor");
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kByte, op, ": messages must be uint8");
  make_quantize_layout(op, offsets, numels, bits, chunk, std::numeric_limits<int64_t>::max());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gcomp, m) {
  m.def(
      "quantize_pack(Tensor buffer, int[] offsets, int[] numels, int bits, int chunk, int[]? seeds=None) "
      "-> Tensor");
  m.def(
      "quantize_unpack_add_(Tensor(a!) out, Tensor messages, int[] offsets, int[] numels, int bits, int chunk, "
      "float weight=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(gcomp, CPU, m) {
  m.impl("quantize_pack", &quantize_pack_cpu);
  m.impl("quantize_unpack_add_", &quantize_unpack_add_cpu);
}

TORCH_LIBRARY_IMPL(gcomp, Meta, m) {
  m.impl("quantize_pack", &quantize_pack_meta);
  m.impl("quantize_unpack_add_", &quantize_unpack_add_meta);
}

}  // namespace gcomp
