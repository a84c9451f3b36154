// CPU kernels of the sparse top-k message ops, their torch op definitions and meta (fake)
// implementations. The byte-level format is in gcomp/sparse_format.h; the pure-torch twin that
// must give identical bytes is gcomp/compress/sparse.py.
//
// Parallel structure: a bucket is cut into work units (a layer, or a 64K-element chunk of a
// layer) handed to OpenMP threads. Every unit writes a disjoint part of the output, and unpacking
// adds message 0, 1, 2, ... to each element in that order whatever the unit boundaries, so the
// result never depends on the thread count. No exception is thrown inside a parallel region:
// kernels record error codes and the host raises after the region.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "gcomp/sparse_format.h"
#include "gcomp/sparse_layout_host.h"

namespace gcomp {
namespace {

using format::BFloat16Bits;
using format::FloatKind;
using format::Half16;
using format::LayerSection;

// Elements per work unit. A multiple of 64, so units own whole bitmap bytes and words.
constexpr int64_t kChunkElements = int64_t(1) << 16;
constexpr int64_t kScanBlock = 16;  // elements tested at once for "any key >= low here?"
constexpr int64_t kSampleMinNumel = int64_t(1) << 15;
constexpr int64_t kSampleRun = 16;  // consecutive elements per sample position: one cache line
constexpr int64_t kPrefetchDistance = 64;  // entries ahead when scattering into the output

// Threads worth waking for `work` (roughly elements touched): every parallel region ends in a
// barrier, and on a busy machine a barrier can wait a whole scheduler tick for a preempted thread,
// so small calls run on the calling thread alone.
constexpr int64_t kWorkPerThread = int64_t(1) << 17;
int thread_count(int64_t work) {
  const int64_t useful = std::max<int64_t>(1, work / kWorkPerThread);
  return static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), useful));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// topk_pack
// ---------------------------------------------------------------------------------------------
// Per layer, selection is exact: a sample of keys brackets the k-th largest key between `low` and
// `high`. One pass over the layer keeps the elements with key >= low (with their values), counts
// the keys above `high` (all selected) and collects the keys inside [low, high]; nth_element on
// those few finds the exact threshold, and ties at the threshold go to the smallest indices. If
// the sample misled the bracket, the layer is redone with low = 0 and high = max (everything
// kept, everything in the bracket), so the sample only ever affects speed, never the result.

template <class Key>
struct PackLayerPlan {
  Key low = 0;                                 // kept: key >= low
  Key high = std::numeric_limits<Key>::max();  // keys above are selected without ranking
  int64_t first_chunk = 0;
  int64_t n_chunks = 0;
  int64_t need = 0;  // entries to take from the bracket: k minus the keys above `high`
  Key kth = 0;       // need-th largest bracket key (or `high` when need == 0)
};

// A chunk after classification: the elements with key >= low (offsets from `begin`, ascending,
// with their values, so later passes never go back to the large, cold input), the keys that fell
// inside the bracket [low, high], and how many keys lay above it.
template <class In, class Key>
struct PackChunk {
  int64_t layer = 0;
  int64_t begin = 0;  // element range inside the layer
  int64_t end = 0;
  std::vector<uint32_t> kept_offset;
  std::vector<In> kept_value;
  std::vector<Key> bracket_key;
  int64_t n_above_high = 0;
  int64_t n_above = 0;  // kept keys > kth
  int64_t n_equal = 0;  // kept keys == kth
  int64_t take_equal = 0;
  int64_t out_base = 0;  // first entry of this chunk in the layer's sorted selection
};

// Thread-private buffers for classifying one chunk without branches. SIMD code stores whole
// vectors past the kept count, hence the slack. Left uninitialised: small calls should not pay
// for clearing buffers sized for the largest chunk.
constexpr int64_t kScratchSlack = 64;
template <class In, class Key>
struct ClassifyScratch {
  std::unique_ptr<uint32_t[]> kept_offset;
  std::unique_ptr<In[]> kept_value;
  std::unique_ptr<Key[]> bracket_key;
  int64_t n_kept = 0;
  int64_t n_bracket = 0;
  int64_t n_above_high = 0;
  explicit ClassifyScratch(int64_t chunk_capacity)
      : kept_offset(new uint32_t[chunk_capacity + kScratchSlack]),
        kept_value(new In[chunk_capacity + kScratchSlack]),
        bracket_key(new Key[chunk_capacity + kScratchSlack]) {}

  void start() { n_kept = n_bracket = n_above_high = 0; }
  void finish(PackChunk<In, Key>& chunk) const {
    chunk.kept_offset.assign(kept_offset.get(), kept_offset.get() + n_kept);
    chunk.kept_value.assign(kept_value.get(), kept_value.get() + n_kept);
    chunk.bracket_key.assign(bracket_key.get(), bracket_key.get() + n_bracket);
    chunk.n_above_high = n_above_high;
  }
};

// The largest chunk a bucket has: its largest layer, capped at kChunkElements.
int64_t largest_chunk(const BucketLayout& layout) {
  int64_t largest = 1;
  for (const int64_t numel : layout.numels) largest = std::max(largest, std::min(numel, kChunkElements));
  return largest;
}

template <class In, class Key>
void plan_layer_by_sampling(const In* x, int64_t numel, int64_t k, PackLayerPlan<Key>& plan) {
  plan.low = 0;
  plan.high = std::numeric_limits<Key>::max();
  if (numel < kSampleMinNumel) return;
  const int64_t n_runs = std::min<int64_t>(1024, std::max<int64_t>(16, numel / 4096));
  const int64_t n_sample = n_runs * kSampleRun;
  const double expected = static_cast<double>(n_sample) * static_cast<double>(k) / numel;
  const double margin = 4.0 * std::sqrt(expected) + 4.0;
  const int64_t rank_low = static_cast<int64_t>(std::ceil(expected + margin));
  const int64_t rank_high = static_cast<int64_t>(std::floor(expected - margin));
  if (rank_low >= n_sample) return;  // nearly everything is selected: a bracket saves nothing
  const int64_t stride = numel / n_runs;  // >= 2048 > kSampleRun
  std::vector<Key> sample(n_sample);
  for (int64_t r = 0; r < n_runs; ++r) {
    for (int64_t i = 0; i < kSampleRun; ++i) {
      sample[r * kSampleRun + i] = format::magnitude_key(x[r * stride + i]);
    }
  }
  std::nth_element(sample.begin(), sample.begin() + rank_low, sample.end(), std::greater<Key>());
  plan.low = sample[rank_low];
  if (rank_high >= 0) {
    std::nth_element(sample.begin(), sample.begin() + rank_high, sample.begin() + rank_low,
                     std::greater<Key>());
    plan.high = sample[rank_high];
  }
}

// True if some element of x[0, n) has magnitude_key >= low (low >= 1). Written as an OR of
// differences whose sign bit is set exactly when a key reaches `low` (keys stay below the sign
// bit), which compilers vectorise where a loop over bool does not.
template <class In, class Key>
bool any_key_at_least(const In* x, int64_t n, Key low) {
  using SignedKey = std::make_signed_t<Key>;
  SignedKey sign_bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    sign_bits |= static_cast<SignedKey>((low - 1) - static_cast<Key>(format::magnitude_bits(x[i])));
  }
  return sign_bits < 0;
}

// Classifies x[first, last) of a chunk into the scratch lists without branches (always store,
// advance the count only if kept).
template <class In, class Key>
void classify_range(const In* x, int64_t first, int64_t last, Key low, Key high,
                    ClassifyScratch<In, Key>& scratch) {
  uint32_t* kept_offset = scratch.kept_offset.get();
  In* kept_value = scratch.kept_value.get();
  Key* bracket_key = scratch.bracket_key.get();
  int64_t n_kept = scratch.n_kept, n_bracket = scratch.n_bracket, n_above_high = scratch.n_above_high;
  for (int64_t i = first; i < last; ++i) {
    const Key key = format::magnitude_key(x[i]);
    kept_offset[n_kept] = static_cast<uint32_t>(i);
    kept_value[n_kept] = x[i];
    n_kept += key >= low;
    bracket_key[n_bracket] = key;
    n_bracket += (key >= low) & (key <= high);
    n_above_high += key > high;
  }
  scratch.n_kept = n_kept;
  scratch.n_bracket = n_bracket;
  scratch.n_above_high = n_above_high;
}

template <class In, class Key>
void classify_chunk_portable(const In* layer, Key low, Key high, PackChunk<In, Key>& chunk,
                             ClassifyScratch<In, Key>& scratch) {
  const In* x = layer + chunk.begin;
  const int64_t length = chunk.end - chunk.begin;
  scratch.start();
  for (int64_t block = 0; block < length; block += kScanBlock) {
    const int64_t block_end = std::min(length, block + kScanBlock);
    // Most blocks hold nothing at or above `low`: skip them after a vectorised test.
    if (low > 0 && !any_key_at_least(x + block, block_end - block, low)) continue;
    classify_range(x, block, block_end, low, high, scratch);
  }
  scratch.finish(chunk);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GCOMP_AVX512_CLASSIFY 1
// float32 chunks, 16 elements per step with AVX-512F: keys (min(|x| bits, NaN key), see
// sparse_format.h) are compared with the bracket and the kept lanes compressed into the scratch
// lists. Register-form compress then a full store (the memory form is slow on some CPUs); the
// scratch has slack for the lanes stored past the count.
__attribute__((target("avx512f,popcnt"))) void classify_chunk_avx512(
    const float* layer, uint32_t low, uint32_t high, PackChunk<float, uint32_t>& chunk,
    ClassifyScratch<float, uint32_t>& scratch) {
  const float* x = layer + chunk.begin;
  const int64_t length = chunk.end - chunk.begin;
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int>(format::kNanKeyFloat32));
  const __m512i low_v = _mm512_set1_epi32(static_cast<int>(low));
  const __m512i high_v = _mm512_set1_epi32(static_cast<int>(high));
  const __m512i step = _mm512_set1_epi32(16);
  const __m512i zero = _mm512_setzero_si512();
  __m512i offsets = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  uint32_t* kept_offset = scratch.kept_offset.get();
  float* kept_value = scratch.kept_value.get();
  uint32_t* bracket_key = scratch.bracket_key.get();
  scratch.start();
  int64_t n_kept = 0, n_bracket = 0, n_above_high = 0;
  int64_t i = 0;
  for (; i + 16 <= length; i += 16, offsets = _mm512_add_epi32(offsets, step)) {
    const __m512i bits = _mm512_loadu_si512(x + i);
    const __m512i key =  // (masked form: the unmasked one trips a false GCC 12 warning)
        _mm512_mask_min_epu32(zero, static_cast<__mmask16>(0xFFFF), _mm512_and_si512(bits, abs_mask), nan_key);
    const __mmask16 kept = _mm512_cmpge_epu32_mask(key, low_v);
    if (kept == 0) continue;
    const __mmask16 above = _mm512_mask_cmpgt_epu32_mask(kept, key, high_v);
    const __mmask16 bracket = static_cast<__mmask16>(kept & ~above);
    _mm512_storeu_si512(kept_offset + n_kept, _mm512_mask_compress_epi32(zero, kept, offsets));
    _mm512_storeu_si512(kept_value + n_kept, _mm512_mask_compress_epi32(zero, kept, bits));
    n_kept += __builtin_popcount(kept);
    _mm512_storeu_si512(bracket_key + n_bracket, _mm512_mask_compress_epi32(zero, bracket, key));
    n_bracket += __builtin_popcount(bracket);
    n_above_high += __builtin_popcount(above);
  }
  scratch.n_kept = n_kept;
  scratch.n_bracket = n_bracket;
  scratch.n_above_high = n_above_high;
  classify_range(x, i, length, low, high, scratch);
  scratch.finish(chunk);
}

bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f"); }
#endif

template <class In, class Key>
void classify_chunk(const In* layer, Key low, Key high, PackChunk<In, Key>& chunk,
                    ClassifyScratch<In, Key>& scratch, bool use_simd) {
#ifdef GCOMP_AVX512_CLASSIFY
  if constexpr (std::is_same_v<In, float>) {
    if (use_simd) return classify_chunk_avx512(layer, low, high, chunk, scratch);
  }
#endif
  (void)use_simd;
  classify_chunk_portable(layer, low, high, chunk, scratch);
}

// The need-th largest of a layer's bracket keys. One histogram pass over (key - low) >> shift
// narrows it to one bin; nth_element then runs on that bin's keys only.
template <class In, class Key>
Key kth_largest_bracket_key(const PackChunk<In, Key>* first, const PackChunk<In, Key>* last,
                            const PackLayerPlan<Key>& plan) {
  constexpr int kBins = 2048;
  int shift = 0;
  while (shift < static_cast<int>(8 * sizeof(Key)) - 1 && ((plan.high - plan.low) >> shift) >= kBins) ++shift;
  std::vector<int64_t> counts(kBins, 0);
  for (const PackChunk<In, Key>* c = first; c != last; ++c) {
    for (const Key key : c->bracket_key) ++counts[(key - plan.low) >> shift];
  }
  int64_t above = 0;  // bracket keys in bins above the chosen one
  int bin = kBins - 1;
  for (; bin > 0 && above + counts[bin] < plan.need; --bin) above += counts[bin];
  std::vector<Key> in_bin;
  in_bin.reserve(static_cast<size_t>(counts[bin]));
  for (const PackChunk<In, Key>* c = first; c != last; ++c) {
    for (const Key key : c->bracket_key) {
      if (static_cast<int>((key - plan.low) >> shift) == bin) in_bin.push_back(key);
    }
  }
  const int64_t rank = plan.need - above - 1;  // 0-based, descending, inside the bin
  std::nth_element(in_bin.begin(), in_bin.begin() + rank, in_bin.end(), std::greater<Key>());
  return in_bin[rank];
}

// Finds the exact threshold among a layer's bracket keys and hands out positions: ties at the
// threshold go to the smallest indices, i.e. to the earliest chunks. With need == 0 every key
// above `high` (and nothing else) is taken.
template <class In, class Key>
void settle_layer(PackLayerPlan<Key>& plan, PackChunk<In, Key>* chunks) {
  PackChunk<In, Key>* first = chunks + plan.first_chunk;
  PackChunk<In, Key>* last = first + plan.n_chunks;
  plan.kth = plan.high;
  if (plan.need > 0) plan.kth = kth_largest_bracket_key(first, last, plan);
  int64_t bracket_above = 0;  // bracket keys above kth: taken, like every key above `high`
  for (PackChunk<In, Key>* c = first; c != last; ++c) {
    c->n_above = c->n_above_high;
    c->n_equal = 0;
    if (plan.need > 0) {
      for (const Key key : c->bracket_key) {
        bracket_above += key > plan.kth;
        c->n_above += key > plan.kth;
        c->n_equal += key == plan.kth;
      }
    }
  }
  int64_t ties_left = plan.need - bracket_above;  // 0 when need == 0
  int64_t position = 0;
  for (PackChunk<In, Key>* c = first; c != last; ++c) {
    c->take_equal = std::min(c->n_equal, ties_left);
    ties_left -= c->take_equal;
    c->out_base = position;
    position += c->n_above + c->take_equal;
  }
}

// Writes a chunk's selected values (and bitmap bits, or indices to `selected` for bit-packing)
// in ascending index order: keys above kth, and the first take_equal keys equal to it.
template <class In, class Key>
void emit_chunk(const PackChunk<In, Key>& chunk, const PackLayerPlan<Key>& plan,
                const LayerSection& section, FloatKind value_kind, uint8_t* message,
                int64_t* selected) {
  uint8_t* values = message + section.value_offset;
  uint8_t* bitmap = section.bitmap ? message + section.index_offset : nullptr;
  const int64_t value_size = format::float_kind_size(value_kind);
  int64_t position = chunk.out_base;
  int64_t ties_left = chunk.take_equal;
  const size_t n_kept = chunk.kept_offset.size();
  for (size_t j = 0; j < n_kept; ++j) {
    const In value = chunk.kept_value[j];
    const Key key = format::magnitude_key(value);
    if (key < plan.kth || (key == plan.kth && ties_left-- <= 0)) continue;
    const int64_t index = chunk.begin + chunk.kept_offset[j];
    format::store_value(values + position * value_size, value_kind, value);
    if (bitmap != nullptr) {
      format::bitmap_set(bitmap, index);
    } else {
      selected[position] = index;
    }
    ++position;
  }
}

template <class In>
void topk_pack_kernel(const In* buffer, const BucketLayout& layout, uint8_t* message) {
  using Key = typename format::KeyOf<In>::type;
  const int64_t n_layers = layout.n_layers();
  int64_t work = 0;
  for (const int64_t numel : layout.numels) work += numel;
  const int threads = thread_count(work);
#ifdef GCOMP_AVX512_CLASSIFY
  // GCOMP_DISABLE_SIMD=1 selects the portable path (so tests can check it on AVX-512 machines).
  const char* disable_simd = std::getenv("GCOMP_DISABLE_SIMD");
  const bool use_simd =
      cpu_has_avx512f() && (disable_simd == nullptr || std::string(disable_simd) != "1");
#else
  const bool use_simd = false;
#endif

  std::vector<PackLayerPlan<Key>> plans(n_layers);
  std::vector<PackChunk<In, Key>> chunks;
  for (int64_t l = 0; l < n_layers; ++l) {
    plans[l].first_chunk = static_cast<int64_t>(chunks.size());
    plans[l].n_chunks = ceil_div(layout.numels[l], kChunkElements);
    for (int64_t c = 0; c < plans[l].n_chunks; ++c) {
      PackChunk<In, Key> chunk;
      chunk.layer = l;
      chunk.begin = c * kChunkElements;
      chunk.end = std::min(layout.numels[l], chunk.begin + kChunkElements);
      chunks.push_back(std::move(chunk));
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  auto layer_data = [&](int64_t l) { return buffer + layout.offsets[l]; };

  std::vector<char> redo(static_cast<size_t>(n_chunks), 0);  // chunks of layers whose bracket failed
  // Indices of bit-packed layers wait here until a layer's chunks have all been emitted.
  std::unique_ptr<int64_t[]> selected(new int64_t[static_cast<size_t>(layout.total_entries())]);

#pragma omp parallel num_threads(threads)
  {
    ClassifyScratch<In, Key> scratch(largest_chunk(layout));
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < n_layers; ++l) {
      plan_layer_by_sampling(layer_data(l), layout.numels[l], layout.ks[l], plans[l]);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const PackLayerPlan<Key>& plan = plans[chunks[c].layer];
      classify_chunk(layer_data(chunks[c].layer), plan.low, plan.high, chunks[c], scratch, use_simd);
    }
#pragma omp single
    {
      // Check each bracket; a misled one is widened to everything and its layer classified again.
      for (int64_t l = 0; l < n_layers; ++l) {
        PackLayerPlan<Key>& plan = plans[l];
        int64_t n_above_high = 0, n_bracket = 0;
        for (int64_t c = plan.first_chunk; c < plan.first_chunk + plan.n_chunks; ++c) {
          n_above_high += chunks[c].n_above_high;
          n_bracket += static_cast<int64_t>(chunks[c].bracket_key.size());
        }
        plan.need = layout.ks[l] - n_above_high;
        if (plan.need < 0 || plan.need > n_bracket) {
          plan.low = 0;
          plan.high = std::numeric_limits<Key>::max();
          plan.need = layout.ks[l];
          std::fill(redo.begin() + plan.first_chunk, redo.begin() + plan.first_chunk + plan.n_chunks, 1);
        }
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      if (!redo[c]) continue;
      classify_chunk(layer_data(chunks[c].layer), Key(0), std::numeric_limits<Key>::max(), chunks[c],
                     scratch, use_simd);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < n_layers; ++l) settle_layer(plans[l], chunks.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t l = chunks[c].layer;
      emit_chunk(chunks[c], plans[l], layout.sections[l], layout.value_kind, message,
                 selected.get() + layout.entry_base[l]);
    }
    // Bit-pack the sorted indices eight at a time: each group owns `bits` whole bytes.
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < n_layers; ++l) {
      const LayerSection& section = layout.sections[l];
      if (section.bitmap) continue;
      const int64_t k = layout.ks[l];
      const int64_t* layer_selected = selected.get() + layout.entry_base[l];
      uint8_t* payload = message + section.index_offset;
      for (int64_t first = 0; first < k; first += format::kIndexGroup) {
        const int count = static_cast<int>(std::min<int64_t>(format::kIndexGroup, k - first));
        format::pack_index_group(layer_selected + first, count, section.bits,
                                 payload + (first / format::kIndexGroup) * section.bits);
      }
    }
  }
}

at::Tensor topk_pack_cpu(const at::Tensor& buffer, c10::IntArrayRef offsets,
                         c10::IntArrayRef numels, c10::IntArrayRef ks, c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.topk_pack";
  check_pack_args(op, buffer);
  const BucketLayout layout =
      make_bucket_layout(op, offsets, numels, ks, value_dtype, buffer.numel());
  at::Tensor message = at::zeros({layout.message_bytes}, buffer.options().dtype(at::kByte));
  uint8_t* out = message.data_ptr<uint8_t>();
  const void* data = buffer.const_data_ptr();
  switch (buffer.scalar_type()) {
    case at::kFloat:
      topk_pack_kernel(static_cast<const float*>(data), layout, out);
      break;
    case at::kDouble:
      topk_pack_kernel(static_cast<const double*>(data), layout, out);
      break;
    case at::kHalf:
      topk_pack_kernel(static_cast<const Half16*>(data), layout, out);
      break;
    default:
      topk_pack_kernel(static_cast<const BFloat16Bits*>(data), layout, out);
      break;
  }
  return message;
}

// ---------------------------------------------------------------------------------------------
// Decoding: validation, then visiting the entries of an element range
// ---------------------------------------------------------------------------------------------
// Every message is validated completely before anything is written to the caller's tensors, so a
// malformed message leaves them untouched. Layers are cut into "ranges" of kChunkElements
// elements, and consecutive ranges into "spans", the units of parallel work when applying. A span
// needs the entries whose index falls in it: for bitmap layers the validation pass records where
// each range's entries start (prefix popcounts); for bit-packed layers a binary search over the
// (validated, increasing) indices finds them.

struct ElementRange {
  int64_t layer;
  int64_t begin;
  int64_t end;
};

std::vector<ElementRange> element_ranges(const BucketLayout& layout) {
  std::vector<ElementRange> ranges;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    for (int64_t b = 0; b < layout.numels[l]; b += kChunkElements) {
      ranges.push_back({l, b, std::min(layout.numels[l], b + kChunkElements)});
    }
  }
  return ranges;
}

struct ValidatedMessages {
  const uint8_t* bytes;
  int64_t n_messages;
  std::vector<ElementRange> ranges;
  // For bitmap layers, entry number of the first entry of range r in message m: [m * n_ranges + r].
  std::vector<int64_t> first_entry;

  const uint8_t* message(int64_t m, int64_t message_bytes) const { return bytes + m * message_bytes; }
};

// Elements a decode or unpack touches: every entry, plus a scan of every bitmap.
int64_t decode_work(const BucketLayout& layout, int64_t n_messages) {
  int64_t per_message = layout.total_entries();
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    if (layout.sections[l].bitmap) per_message += layout.numels[l] / 8;
  }
  return n_messages * per_message;
}

ValidatedMessages validate_messages(const char* op, const uint8_t* bytes, int64_t n_messages,
                                    const BucketLayout& layout) {
  ValidatedMessages validated{bytes, n_messages, element_ranges(layout), {}};
  const int64_t n_ranges = static_cast<int64_t>(validated.ranges.size());
  validated.first_entry.assign(static_cast<size_t>(n_messages * n_ranges), 0);

  // Work items: (message, range) for bitmap layers, (message, entry run) for bit-packed layers.
  struct CheckUnit {
    int64_t message, layer, begin, end, range;
    int32_t error;
  };
  std::vector<CheckUnit> units;
  for (int64_t m = 0; m < n_messages; ++m) {
    for (int64_t r = 0; r < n_ranges; ++r) {
      const ElementRange& range = validated.ranges[r];
      if (layout.sections[range.layer].bitmap) {
        units.push_back({m, range.layer, range.begin, range.end, r, kDecodeOk});
      } else if (range.begin == 0) {
        const int64_t k = layout.ks[range.layer];
        for (int64_t j = 0; j < k; j += kChunkElements) {
          units.push_back({m, range.layer, j, std::min(k, j + kChunkElements), -1, kDecodeOk});
        }
      }
    }
  }
  const int64_t n_units = static_cast<int64_t>(units.size());
  std::vector<int64_t> popcounts(static_cast<size_t>(n_units), 0);

#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(decode_work(layout, n_messages)))
  for (int64_t u = 0; u < n_units; ++u) {
    CheckUnit& unit = units[u];
    const LayerSection& section = layout.sections[unit.layer];
    const uint8_t* payload = bytes + unit.message * layout.message_bytes + section.index_offset;
    const int64_t numel = layout.numels[unit.layer];
    if (section.bitmap) {
      const int64_t end_byte = ceil_div(unit.end, 8);
      int64_t count = 0;
      for (int64_t byte = unit.begin / 8; byte < end_byte; byte += 8) {
        const int n_bytes = static_cast<int>(std::min<int64_t>(8, end_byte - byte));
        count += format::popcount64(format::load_bitmap_word(payload + byte, n_bytes));
      }
      if (unit.end == numel && (payload[end_byte - 1] & format::bitmap_tail_mask(numel)) != 0) {
        unit.error = kBitmapBitBeyondNumel;
      }
      popcounts[u] = count;
      continue;
    }
    const int64_t k = layout.ks[unit.layer];
    int64_t previous =
        unit.begin == 0 ? -1 : format::read_packed_index(payload, unit.begin - 1, section.bits);
    int64_t group[format::kIndexGroup];
    for (int64_t first = unit.begin; first < unit.end && unit.error == kDecodeOk;
         first += format::kIndexGroup) {
      const int count = static_cast<int>(std::min<int64_t>(format::kIndexGroup, k - first));
      format::unpack_index_group(payload + (first / format::kIndexGroup) * section.bits, count,
                                 section.bits, group);
      for (int t = 0; t < count; ++t) {
        if (group[t] >= numel) {
          unit.error = kIndexOutOfRange;
        } else if (group[t] <= previous) {
          unit.error = kIndexNotIncreasing;
        }
        previous = group[t];
      }
    }
  }
  for (const CheckUnit& unit : units) {
    if (unit.error != kDecodeOk) raise_decode_error(op, unit.message, unit.layer, unit.error);
  }
  // Prefix popcounts per (message, bitmap layer); the units of one pair are consecutive.
  for (int64_t u = 0; u < n_units;) {
    const int64_t m = units[u].message, l = units[u].layer;
    if (!layout.sections[l].bitmap) {
      ++u;
      continue;
    }
    int64_t running = 0;
    for (; u < n_units && units[u].message == m && units[u].layer == l; ++u) {
      validated.first_entry[m * n_ranges + units[u].range] = running;
      running += popcounts[u];
    }
    if (running != layout.ks[l]) raise_decode_error(op, m, l, kBitmapCountMismatch);
  }
  return validated;
}

// First entry j in [lo, hi) whose packed index is >= target (indices already validated increasing).
int64_t lower_bound_packed(const uint8_t* payload, int bits, int64_t lo, int64_t hi, int64_t target) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (format::read_packed_index(payload, mid, bits) < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Consecutive element ranges of one layer, applied as one unit: sparse layers group many ranges
// so that each unit has a few thousand entries per message (per-unit setup stays negligible).
struct ElementSpan {
  int64_t layer;
  int64_t begin;
  int64_t end;
  int64_t first_range;  // index in ValidatedMessages::ranges of the range starting at `begin`
};

constexpr int64_t kEntriesPerSpan = 4096;  // per message, on average
constexpr int64_t kMaxRangesPerSpan = 64;

std::vector<ElementSpan> element_spans(const BucketLayout& layout, const std::vector<ElementRange>& ranges) {
  std::vector<ElementSpan> spans;
  for (int64_t r = 0; r < static_cast<int64_t>(ranges.size());) {
    const int64_t l = ranges[r].layer;
    const double entries_per_range =
        static_cast<double>(layout.ks[l]) * kChunkElements / static_cast<double>(layout.numels[l]);
    const int64_t group = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(kEntriesPerSpan / entries_per_range)), 1, kMaxRangesPerSpan);
    int64_t last = r;
    while (last + 1 < static_cast<int64_t>(ranges.size()) && ranges[last + 1].layer == l &&
           last + 1 - r < group) {
      ++last;
    }
    spans.push_back({l, ranges[r].begin, ranges[last].end, r});
    r = last + 1;
  }
  return spans;
}

// Calls visit(entry j, index) for the entries of message m whose index lies in the span,
// ascending; j runs over consecutive entry numbers.
template <class Visit>
void visit_span(const ValidatedMessages& validated, const BucketLayout& layout, int64_t m,
                const ElementSpan& span, Visit&& visit) {
  const int64_t l = span.layer;
  const LayerSection& section = layout.sections[l];
  const uint8_t* payload = validated.message(m, layout.message_bytes) + section.index_offset;
  if (section.bitmap) {
    int64_t j = validated.first_entry[m * static_cast<int64_t>(validated.ranges.size()) + span.first_range];
    const int64_t end_byte = ceil_div(span.end, 8);
    for (int64_t byte = span.begin / 8; byte < end_byte; byte += 8) {
      const int n_bytes = static_cast<int>(std::min<int64_t>(8, end_byte - byte));
      for (uint64_t word = format::load_bitmap_word(payload + byte, n_bytes); word != 0;
           word &= word - 1u) {
        visit(j++, byte * 8 + format::lowest_set_bit(word));
      }
    }
    return;
  }
  const int64_t k = layout.ks[l];
  int64_t j = 0, last = k;
  if (span.begin > 0) j = lower_bound_packed(payload, section.bits, 0, k, span.begin);
  if (span.end < layout.numels[l]) last = lower_bound_packed(payload, section.bits, j, k, span.end);
  int64_t group[format::kIndexGroup];
  int64_t decoded_group = -1;
  for (; j < last; ++j) {
    const int64_t g = j / format::kIndexGroup;
    if (g != decoded_group) {
      const int count = static_cast<int>(
          std::min<int64_t>(format::kIndexGroup, k - g * format::kIndexGroup));
      format::unpack_index_group(payload + g * section.bits, count, section.bits, group);
      decoded_group = g;
    }
    visit(j, group[j % format::kIndexGroup]);
  }
}

// ---------------------------------------------------------------------------------------------
// sparse_unpack_add_
// ---------------------------------------------------------------------------------------------

template <FloatKind kValueKind, class Out, class Scale>
void add_messages(Out* out, const ValidatedMessages& validated, const BucketLayout& layout,
                  Scale scale) {
  const std::vector<ElementSpan> spans = element_spans(layout, validated.ranges);
  const int64_t n_spans = static_cast<int64_t>(spans.size());
  int64_t longest_span = 1;
  for (const ElementSpan& span : spans) longest_span = std::max(longest_span, span.end - span.begin);
#pragma omp parallel num_threads(thread_count(decode_work(layout, validated.n_messages)))
  {
    // The entries of one (span, message): positions relative to the span start. Collected first
    // so the scattered read-modify-writes can be prefetched ahead; at low density nearly every
    // entry touches its own cold cache line. (Allocated, not cleared: only used pages cost.)
    const std::unique_ptr<uint32_t[]> positions(new uint32_t[longest_span]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_spans; ++u) {
      const ElementSpan& span = spans[u];
      Out* span_out = out + layout.offsets[span.layer] + span.begin;
      for (int64_t m = 0; m < validated.n_messages; ++m) {  // fixed order: identical sums everywhere
        const uint8_t* values =
            validated.message(m, layout.message_bytes) + layout.sections[span.layer].value_offset;
        int64_t first_entry = -1, count = 0;
        visit_span(validated, layout, m, span, [&](int64_t j, int64_t index) {
          if (first_entry < 0) first_entry = j;
          positions[count++] = static_cast<uint32_t>(index - span.begin);
        });
        for (int64_t t = 0; t < std::min(count, kPrefetchDistance); ++t) {
          __builtin_prefetch(span_out + positions[t], 1);
        }
        for (int64_t t = 0; t < count; ++t) {
          if (t + kPrefetchDistance < count) __builtin_prefetch(span_out + positions[t + kPrefetchDistance], 1);
          format::accumulate_scaled(span_out + positions[t],
                                    format::load_value(values, kValueKind, first_entry + t), scale);
        }
      }
    }
  }
}

template <class Out, class Scale>
void add_messages_for_value_kind(Out* out, const ValidatedMessages& validated,
                                 const BucketLayout& layout, Scale scale) {
  switch (layout.value_kind) {
    case FloatKind::kFloat32:
      add_messages<FloatKind::kFloat32>(out, validated, layout, scale);
      break;
    case FloatKind::kFloat16:
      add_messages<FloatKind::kFloat16>(out, validated, layout, scale);
      break;
    default:
      add_messages<FloatKind::kBFloat16>(out, validated, layout, scale);
      break;
  }
}

void sparse_unpack_add_cpu(const at::Tensor& out, const at::Tensor& messages_in,
                           c10::IntArrayRef offsets, c10::IntArrayRef numels, c10::IntArrayRef ks,
                           c10::ScalarType value_dtype, double scale) {
  constexpr const char* op = "gcomp.sparse_unpack_add_";
  check_unpack_out(op, out, messages_in);
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype, out.numel());
  check_layers_disjoint(op, layout);
  const int64_t n_messages = check_messages(op, messages_in, layout);
  if (n_messages == 0 || layout.n_layers() == 0) return;
  const at::Tensor messages = messages_in.contiguous();
  const ValidatedMessages validated =
      validate_messages(op, messages.const_data_ptr<uint8_t>(), n_messages, layout);
  void* data = out.data_ptr();
  switch (out.scalar_type()) {
    case at::kFloat:
      add_messages_for_value_kind(static_cast<float*>(data), validated, layout,
                                  static_cast<float>(scale));
      break;
    case at::kDouble:
      add_messages_for_value_kind(static_cast<double*>(data), validated, layout, scale);
      break;
    case at::kHalf:
      add_messages_for_value_kind(static_cast<Half16*>(data), validated, layout,
                                  static_cast<float>(scale));
      break;
    default:
      add_messages_for_value_kind(static_cast<BFloat16Bits*>(data), validated, layout,
                                  static_cast<float>(scale));
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// sparse_unpack: messages -> (values, absolute indices)
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sparse_unpack_cpu(const at::Tensor& messages_in,
                                                     c10::IntArrayRef offsets,
                                                     c10::IntArrayRef numels, c10::IntArrayRef ks,
                                                     c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.sparse_unpack";
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype,
                                                 std::numeric_limits<int64_t>::max());
  const int64_t n_messages = check_messages(op, messages_in, layout);
  const int64_t total_entries = layout.total_entries();
  std::vector<int64_t> shape = {n_messages, total_entries};
  if (messages_in.dim() == 1) shape.erase(shape.begin());
  at::Tensor values = at::empty(shape, messages_in.options().dtype(value_dtype));
  at::Tensor indices = at::empty(shape, messages_in.options().dtype(at::kLong));
  if (n_messages == 0 || total_entries == 0) return {values, indices};
  const at::Tensor messages = messages_in.contiguous();
  const ValidatedMessages validated =
      validate_messages(op, messages.const_data_ptr<uint8_t>(), n_messages, layout);
  int64_t* index_data = indices.data_ptr<int64_t>();
  uint8_t* value_data = static_cast<uint8_t*>(values.data_ptr());
  const int64_t value_size = format::float_kind_size(layout.value_kind);
  const std::vector<ElementSpan> spans = element_spans(layout, validated.ranges);
  const int64_t n_spans = static_cast<int64_t>(spans.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(decode_work(layout, n_messages)))
  for (int64_t mu = 0; mu < n_messages * n_spans; ++mu) {
    const int64_t m = mu / n_spans;
    const ElementSpan& span = spans[mu % n_spans];
    const int64_t l = span.layer;
    int64_t* row = index_data + m * total_entries + layout.entry_base[l];
    const int64_t offset = layout.offsets[l];
    visit_span(validated, layout, m, span, [&](int64_t j, int64_t index) { row[j] = offset + index; });
    if (span.begin == 0) {
      std::memcpy(value_data + (m * total_entries + layout.entry_base[l]) * value_size,
                  validated.message(m, layout.message_bytes) + layout.sections[l].value_offset,
                  static_cast<size_t>(layout.ks[l] * value_size));
    }
  }
  return {values, indices};
}

// ---------------------------------------------------------------------------------------------
// Meta (fake) implementations: shapes only, so torch.compile can trace the ops
// ---------------------------------------------------------------------------------------------
// Under dynamic shapes tensor sizes may be symbolic, so these check only what the int lists and
// dtypes decide; the real kernels check the rest.

at::Tensor topk_pack_meta(const at::Tensor& buffer, c10::IntArrayRef offsets,
                          c10::IntArrayRef numels, c10::IntArrayRef ks, c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.topk_pack";
  TORCH_CHECK_VALUE(is_buffer_dtype(buffer.scalar_type()) && buffer.dim() == 1, op,
                    ": buffer must be a 1-D float32/float64/float16/bfloat16 tensor");
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype,
                                                 std::numeric_limits<int64_t>::max());
  return at::empty({layout.message_bytes}, buffer.options().dtype(at::kByte));
}

void sparse_unpack_add_meta(const at::Tensor& out, const at::Tensor& messages,
                            c10::IntArrayRef offsets, c10::IntArrayRef numels, c10::IntArrayRef ks,
                            c10::ScalarType value_dtype, double /*scale*/) {
  constexpr const char* op = "gcomp.sparse_unpack_add_";
  TORCH_CHECK_VALUE(is_buffer_dtype(out.scalar_type()), op,
                    ": out must be float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kByte, op, ": messages must be uint8");
  make_bucket_layout(op, offsets, numels, ks, value_dtype, std::numeric_limits<int64_t>::max());
}

std::tuple<at::Tensor, at::Tensor> sparse_unpack_meta(const at::Tensor& messages,
                                                      c10::IntArrayRef offsets,
                                                      c10::IntArrayRef numels, c10::IntArrayRef ks,
                                                      c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.sparse_unpack";
  TORCH_CHECK_VALUE(messages.scalar_type() == at::kByte, op, ": messages must be uint8");
  TORCH_CHECK_VALUE(messages.dim() == 1 || messages.dim() == 2, op, ": messages must be 1-D or 2-D");
  const BucketLayout layout = make_bucket_layout(op, offsets, numels, ks, value_dtype,
                                                 std::numeric_limits<int64_t>::max());
  std::vector<c10::SymInt> shape;
  if (messages.dim() == 2) shape.push_back(messages.sym_size(0));
  shape.emplace_back(layout.total_entries());
  return {at::empty_symint(shape, messages.options().dtype(value_dtype)),
          at::empty_symint(shape, messages.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY(gcomp, m) {
  m.def(
      "topk_pack(Tensor buffer, int[] offsets, int[] numels, int[] ks, ScalarType value_dtype) "
      "-> Tensor");
  m.def(
      "sparse_unpack_add_(Tensor(a!) out, Tensor messages, int[] offsets, int[] numels, int[] ks, "
      "ScalarType value_dtype, float scale) -> ()");
  m.def(
      "sparse_unpack(Tensor messages, int[] offsets, int[] numels, int[] ks, "
      "ScalarType value_dtype) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(gcomp, CPU, m) {
  m.impl("topk_pack", &topk_pack_cpu);
  m.impl("sparse_unpack_add_", &sparse_unpack_add_cpu);
  m.impl("sparse_unpack", &sparse_unpack_cpu);
}

TORCH_LIBRARY_IMPL(gcomp, Meta, m) {
  m.impl("topk_pack", &topk_pack_meta);
  m.impl("sparse_unpack_add_", &sparse_unpack_add_meta);
  m.impl("sparse_unpack", &sparse_unpack_meta);
}

}  // namespace gcomp

// Importing gcomp._C loads this library and thereby registers the ops above; the module itself
// exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
