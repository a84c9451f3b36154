// CUDA kernels of the sparse message ops, on raw pointers (no torch header: plain nvcc builds it).
// Per-element logic (keys, conversions, index packing, bitmaps, accumulation) comes from
// gcomp/sparse_format.h, the same functions the CPU kernels call.
//
// topk_pack, per bucket, all layers batched in each launch:
//   1. radix select, 8 bits per pass from the top: histogram the keys that match the prefix
//      chosen so far, then pick the digit holding the k-th largest key. After the last pass the
//      prefix is the exact k-th largest key T and `remaining` says how many keys equal to T to take.
//   2. per tile, count keys above T and equal to T; per layer, scan those counts over tiles.
//   3. per tile, rank each element with a block scan (in index order): an element is selected if
//      its key is above T, or equal to T among the first `remaining` such (ties to smaller index).
//      Its position is (#above before it) + min(#equal before it, remaining). Values go straight
//      into the message, indices into a scratch array (ascending per layer).
//   4. encode indices: one thread per group of 8 indices (bit-packed) or per bitmap byte.
// Decoding validates everything into a status word the host reads back before adding anything.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "gcomp/sparse_format.h"
#include "gcomp/sparse_kernels.h"

namespace gcomp {
namespace cuda {
#if defined(__CUDACC_RTC__)
// A run-time compilation (NVRTC, gcomp/native_cupy.py) looks kernels up by name from Python, so
// they get external linkage there: gcomp::cuda::rtc::<kernel>.
namespace rtc {
#else
namespace {
#endif

using format::BFloat16Bits;
using format::FloatKind;
using format::Half16;

constexpr int kThreads = 256;
constexpr int kRoundsPerTile = static_cast<int>(kPackTileElements / kThreads);
constexpr int kRadixBins = 256;
constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;  // grid-stride kernels cap their grid here

// Bits a key of each input type can occupy (16-bit types need two radix passes, not four).
template <class In>
struct KeyBits {
  static constexpr int value = 32;
};
template <>
struct KeyBits<double> {
  static constexpr int value = 64;
};
template <>
struct KeyBits<Half16> {
  static constexpr int value = 16;
};
template <>
struct KeyBits<BFloat16Bits> {
  static constexpr int value = 16;
};

// Per layer progress of the radix select.
struct RadixState {
  unsigned long long prefix;  // key bits chosen so far
  unsigned long long mask;    // which bits of the key `prefix` fixes
  long long remaining;        // how many of the keys matching `prefix` are still to be taken
};

__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if !defined(__CUDACC_RTC__)  // host-side functions of the launchers (NVRTC compiles device code only)
size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

unsigned int grid_for(int64_t items) {
  const int64_t blocks = ceil_div(items, kThreads);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxGridBlocks ? kMaxGridBlocks : blocks));
}
#endif

// Index of the last layer whose `first` field is <= item (fields are non-decreasing).
template <class Layer, class First>
__device__ int64_t find_layer(const Layer* layers, int64_t n_layers, int64_t item, First first) {
  int64_t lo = 0, hi = n_layers;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first(layers[mid]) <= item) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ int64_t lower_bound_index(const int64_t* sorted, int64_t n, int64_t target) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// topk_pack
// ---------------------------------------------------------------------------------------------

__global__ void init_radix_kernel(const PackLayer* layers, int64_t n_layers, RadixState* state) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l < n_layers) state[l] = RadixState{0ull, 0ull, static_cast<long long>(layers[l].k)};
}

template <class In>
__global__ void radix_histogram_kernel(const In* buffer, const PackLayer* layers, int64_t n_layers,
                                       const RadixState* state, unsigned long long* histograms,
                                       int shift) {
  using Key = typename format::KeyOf<In>::type;
  __shared__ unsigned int bins[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) bins[b] = 0;
  __syncthreads();
  const int64_t tile = blockIdx.x;
  const int64_t l = find_layer(layers, n_layers, tile, [](const PackLayer& p) { return p.first_tile; });
  const PackLayer& layer = layers[l];
  const In* x = buffer + layer.offset;
  const int64_t begin = (tile - layer.first_tile) * kPackTileElements;
  const int64_t end = begin + kPackTileElements < layer.numel ? begin + kPackTileElements : layer.numel;
  const Key prefix = static_cast<Key>(state[l].prefix);
  const Key mask = static_cast<Key>(state[l].mask);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const Key key = format::magnitude_key(x[i]);
    if ((key & mask) == prefix) atomicAdd(&bins[(key >> shift) & 0xFFu], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) {
    if (bins[b] != 0) atomicAdd(&histograms[l * kRadixBins + b], static_cast<unsigned long long>(bins[b]));
  }
}

// One thread per layer: the digit whose bin holds the `remaining`-th largest matching key.
__global__ void radix_pick_digit_kernel(int64_t n_layers, RadixState* state,
                                        unsigned long long* histograms, int shift) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= n_layers) return;
  RadixState s = state[l];
  unsigned long long* bins = histograms + l * kRadixBins;
  long long above = 0;
  int digit = 0;
  for (int d = kRadixBins - 1; d >= 0; --d) {
    const long long count = static_cast<long long>(bins[d]);
    if (above + count >= s.remaining) {
      digit = d;
      break;
    }
    above += count;
  }
  s.remaining -= above;
  s.prefix |= static_cast<unsigned long long>(digit) << shift;
  s.mask |= 0xFFull << shift;
  state[l] = s;
  for (int d = 0; d < kRadixBins; ++d) bins[d] = 0;  // ready for the next pass
}

template <class In>
__global__ void count_tile_kernel(const In* buffer, const PackLayer* layers, int64_t n_layers,
                                  const RadixState* state, long long* tile_above,
                                  long long* tile_equal) {
  using Key = typename format::KeyOf<In>::type;
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int64_t tile = blockIdx.x;
  const int64_t l = find_layer(layers, n_layers, tile, [](const PackLayer& p) { return p.first_tile; });
  const PackLayer& layer = layers[l];
  const In* x = buffer + layer.offset;
  const int64_t begin = (tile - layer.first_tile) * kPackTileElements;
  const int64_t end = begin + kPackTileElements < layer.numel ? begin + kPackTileElements : layer.numel;
  const Key threshold = static_cast<Key>(state[l].prefix);
  int above = 0, equal = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const Key key = format::magnitude_key(x[i]);
    above += key > threshold;
    equal += key == threshold;
  }
  const int total_above = Reduce(reduce_storage).Sum(above);
  __syncthreads();
  const int total_equal = Reduce(reduce_storage).Sum(equal);
  if (threadIdx.x == 0) {
    tile_above[tile] = total_above;
    tile_equal[tile] = total_equal;
  }
}

// One block per layer: exclusive prefix of the tile counts over the layer's tiles, in place.
__global__ void scan_tiles_kernel(const PackLayer* layers, int64_t n_layers, int64_t total_tiles,
                                  long long* tile_above, long long* tile_equal) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t l = blockIdx.x;
  const int64_t first = layers[l].first_tile;
  const int64_t end = l + 1 < n_layers ? layers[l + 1].first_tile : total_tiles;
  long long carry_above = 0, carry_equal = 0;
  for (int64_t base = first; base < end; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const long long above = t < end ? tile_above[t] : 0;
    const long long equal = t < end ? tile_equal[t] : 0;
    long long above_before, equal_before, above_total, equal_total;
    Scan(scan_storage).ExclusiveSum(above, above_before, above_total);
    __syncthreads();
    Scan(scan_storage).ExclusiveSum(equal, equal_before, equal_total);
    __syncthreads();
    if (t < end) {
      tile_above[t] = carry_above + above_before;
      tile_equal[t] = carry_equal + equal_before;
    }
    carry_above += above_total;
    carry_equal += equal_total;
  }
}

template <class In>
__global__ void write_selected_kernel(const In* buffer, const PackLayer* layers, int64_t n_layers,
                                      const RadixState* state, const long long* tile_above,
                                      const long long* tile_equal, FloatKind value_kind,
                                      uint8_t* message, int64_t* selected) {
  using Key = typename format::KeyOf<In>::type;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t tile = blockIdx.x;
  const int64_t l = find_layer(layers, n_layers, tile, [](const PackLayer& p) { return p.first_tile; });
  const PackLayer& layer = layers[l];
  const In* x = buffer + layer.offset;
  const int64_t begin = (tile - layer.first_tile) * kPackTileElements;
  const int64_t end = begin + kPackTileElements < layer.numel ? begin + kPackTileElements : layer.numel;
  const Key threshold = static_cast<Key>(state[l].prefix);
  const long long ties = state[l].remaining;
  long long above_base = tile_above[tile];
  long long equal_base = tile_equal[tile];
  uint8_t* values = message + layer.section.value_offset;
  const int64_t value_size = format::float_kind_size(value_kind);
  int64_t* layer_selected = selected + layer.entry_base;
  for (int round = 0; round < kRoundsPerTile; ++round) {
    const int64_t i = begin + static_cast<int64_t>(round) * kThreads + threadIdx.x;
    const bool in_tile = i < end;
    const Key key = in_tile ? format::magnitude_key(x[i]) : Key(0);
    const bool above = in_tile && key > threshold;
    const bool equal = in_tile && key == threshold;
    // (#above, #equal) before this thread, packed in one scan: both are <= kPackTileElements.
    const unsigned long long flags = (static_cast<unsigned long long>(above) << 32) | (equal ? 1ull : 0ull);
    unsigned long long before, total;
    Scan(scan_storage).ExclusiveSum(flags, before, total);
    const long long above_before = above_base + static_cast<long long>(before >> 32);
    const long long equal_before = equal_base + static_cast<long long>(before & 0xFFFFFFFFull);
    if (above || (equal && equal_before < ties)) {
      const long long position = above_before + (equal_before < ties ? equal_before : ties);
      format::store_value(values + position * value_size, value_kind, x[i]);
      layer_selected[position] = i;
    }
    above_base += static_cast<long long>(total >> 32);
    equal_base += static_cast<long long>(total & 0xFFFFFFFFull);
    __syncthreads();
  }
}

// One thread per group of 8 indices (bit-packed layers) or per bitmap byte (bitmap layers).
__global__ void encode_indices_kernel(const PackLayer* layers, int64_t n_layers, int64_t total_items,
                                      const int64_t* selected, uint8_t* message) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < total_items;
       item += stride) {
    const int64_t l =
        find_layer(layers, n_layers, item, [](const PackLayer& p) { return p.first_index_item; });
    const PackLayer& layer = layers[l];
    const int64_t local = item - layer.first_index_item;
    const int64_t* layer_selected = selected + layer.entry_base;
    uint8_t* payload = message + layer.section.index_offset;
    if (layer.section.bitmap) {
      const int64_t low = local * 8;
      uint8_t byte = 0;
      for (int64_t j = lower_bound_index(layer_selected, layer.k, low);
           j < layer.k && layer_selected[j] < low + 8; ++j) {
        format::bitmap_set(&byte, layer_selected[j] - low);
      }
      payload[local] = byte;
    } else {
      const int64_t first = local * format::kIndexGroup;
      const int count = static_cast<int>(
          layer.k - first < format::kIndexGroup ? layer.k - first : format::kIndexGroup);
      format::pack_index_group(layer_selected + first, count, layer.section.bits,
                               payload + local * layer.section.bits);
    }
  }
}

#if !defined(__CUDACC_RTC__)
template <class In>
cudaError_t pack_for_input(const In* buffer, const PackLayer* layers, const PackPlan& plan,
                           FloatKind value_kind, uint8_t* message, void* workspace,
                           cudaStream_t stream) {
  if (plan.n_layers == 0) return cudaGetLastError();
  uint8_t* cursor = static_cast<uint8_t*>(workspace);
  RadixState* state = reinterpret_cast<RadixState*>(cursor);
  cursor += align_up(sizeof(RadixState) * plan.n_layers);
  unsigned long long* histograms = reinterpret_cast<unsigned long long*>(cursor);
  const size_t histogram_bytes = sizeof(unsigned long long) * kRadixBins * plan.n_layers;
  cursor += align_up(histogram_bytes);
  long long* tile_above = reinterpret_cast<long long*>(cursor);
  cursor += align_up(sizeof(long long) * plan.total_tiles);
  long long* tile_equal = reinterpret_cast<long long*>(cursor);
  cursor += align_up(sizeof(long long) * plan.total_tiles);
  int64_t* selected = reinterpret_cast<int64_t*>(cursor);

  const unsigned int layer_grid = static_cast<unsigned int>(ceil_div(plan.n_layers, kThreads));
  const unsigned int tile_grid = static_cast<unsigned int>(plan.total_tiles);
  init_radix_kernel<<<layer_grid, kThreads, 0, stream>>>(layers, plan.n_layers, state);
  cudaError_t status = cudaMemsetAsync(histograms, 0, histogram_bytes, stream);
  if (status != cudaSuccess) return status;
  for (int shift = KeyBits<In>::value - 8; shift >= 0; shift -= 8) {
    radix_histogram_kernel<In><<<tile_grid, kThreads, 0, stream>>>(buffer, layers, plan.n_layers, state,
                                                                   histograms, shift);
    radix_pick_digit_kernel<<<layer_grid, kThreads, 0, stream>>>(plan.n_layers, state, histograms, shift);
  }
  count_tile_kernel<In><<<tile_grid, kThreads, 0, stream>>>(buffer, layers, plan.n_layers, state,
                                                            tile_above, tile_equal);
  scan_tiles_kernel<<<static_cast<unsigned int>(plan.n_layers), kThreads, 0, stream>>>(
      layers, plan.n_layers, plan.total_tiles, tile_above, tile_equal);
  write_selected_kernel<In><<<tile_grid, kThreads, 0, stream>>>(
      buffer, layers, plan.n_layers, state, tile_above, tile_equal, value_kind, message, selected);
  if (plan.total_index_items > 0) {
    encode_indices_kernel<<<grid_for(plan.total_index_items), kThreads, 0, stream>>>(
        layers, plan.n_layers, plan.total_index_items, selected, message);
  }
  return cudaGetLastError();
}
#endif  // !__CUDACC_RTC__

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

__device__ void report_failure(DecodeStatus* status, int64_t message, int64_t n_layers, int64_t layer,
                               int code) {
  const unsigned long long failure =
      static_cast<unsigned long long>(message * n_layers + layer) * 8ull + static_cast<unsigned long long>(code);
  atomicMin(&status->first_failure, failure);
}

// Decoding error codes (kept equal to the host's DecodeError values).
constexpr int kIndexOutOfRange = 1;
constexpr int kIndexNotIncreasing = 2;
constexpr int kBitmapBitBeyondNumel = 3;
constexpr int kBitmapCountMismatch = 4;

// One thread per (message, group of 8 bit-packed indices).
__global__ void decode_groups_kernel(const uint8_t* messages, const UnpackLayer* layers,
                                     DecodePlan plan, int64_t* indices, DecodeStatus* status) {
  const int64_t m = blockIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < plan.total_groups;
       g += stride) {
    const int64_t l = find_layer(layers, plan.n_layers, g, [](const UnpackLayer& u) { return u.first_group; });
    const UnpackLayer& layer = layers[l];
    const int bits = layer.section.bits;
    const int64_t local = g - layer.first_group;
    const int64_t first = local * format::kIndexGroup;
    const int count = static_cast<int>(
        layer.k - first < format::kIndexGroup ? layer.k - first : format::kIndexGroup);
    const uint8_t* payload = messages + m * plan.message_bytes + layer.section.index_offset;
    int64_t group[format::kIndexGroup];
    format::unpack_index_group(payload + local * bits, count, bits, group);
    int64_t previous = first == 0 ? -1 : format::read_packed_index(payload, first - 1, bits);
    int code = 0;
    int64_t* row = indices + m * plan.total_entries + layer.entry_base;
    for (int t = 0; t < count; ++t) {
      if (group[t] >= layer.numel) {
        code = kIndexOutOfRange;
      } else if (group[t] <= previous && code == 0) {
        code = kIndexNotIncreasing;
      }
      previous = group[t];
      row[first + t] = group[t];
    }
    if (code != 0) report_failure(status, m, plan.n_layers, l, code);
  }
}

// Locates the 8-byte bitmap word a thread of a bitmap tile owns; false if beyond the bitmap.
__device__ bool bitmap_word_of_thread(const uint8_t* messages, const UnpackLayer* layers,
                                      const DecodePlan& plan, int64_t tile, int64_t m, int64_t* layer_out,
                                      int64_t* byte_out, uint64_t* word_out) {
  const int64_t l =
      find_layer(layers, plan.n_layers, tile, [](const UnpackLayer& u) { return u.first_bitmap_tile; });
  const UnpackLayer& layer = layers[l];
  const int64_t n_bytes = format::bitmap_bytes(layer.numel);
  const int64_t byte = (tile - layer.first_bitmap_tile) * kBitmapTileBytes + threadIdx.x * 8;
  *layer_out = l;
  *byte_out = byte;
  *word_out = 0;
  if (byte >= n_bytes) return false;
  const uint8_t* payload = messages + m * plan.message_bytes + layer.section.index_offset;
  const int span = static_cast<int>(n_bytes - byte < 8 ? n_bytes - byte : 8);
  *word_out = format::load_bitmap_word(payload + byte, span);
  return true;
}

// One block per (message, bitmap tile): popcount of the tile and the check of bits >= numel.
__global__ void bitmap_count_kernel(const uint8_t* messages, const UnpackLayer* layers, DecodePlan plan,
                                    long long* tile_counts, DecodeStatus* status) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int64_t tile = blockIdx.x, m = blockIdx.y;
  int64_t l, byte;
  uint64_t word;
  int count = 0;
  if (bitmap_word_of_thread(messages, layers, plan, tile, m, &l, &byte, &word)) {
    count = format::popcount64(word);
    const UnpackLayer& layer = layers[l];
    const int64_t n_bytes = format::bitmap_bytes(layer.numel);
    const uint8_t* payload = messages + m * plan.message_bytes + layer.section.index_offset;
    if (byte + 8 >= n_bytes && (payload[n_bytes - 1] & format::bitmap_tail_mask(layer.numel)) != 0) {
      report_failure(status, m, plan.n_layers, l, kBitmapBitBeyondNumel);
    }
  }
  const int total = Reduce(reduce_storage).Sum(count);
  if (threadIdx.x == 0) tile_counts[m * plan.total_bitmap_tiles + tile] = total;
}

// One block per (message, bitmap layer): tile popcounts become exclusive prefixes; total == k?
__global__ void bitmap_scan_kernel(const UnpackLayer* layers, DecodePlan plan, long long* tile_counts,
                                   DecodeStatus* status) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t l = blockIdx.x, m = blockIdx.y;
  const UnpackLayer& layer = layers[l];
  if (!layer.section.bitmap) return;
  const int64_t first = layer.first_bitmap_tile;
  const int64_t end = first + ceil_div(format::bitmap_bytes(layer.numel), kBitmapTileBytes);
  long long* counts = tile_counts + m * plan.total_bitmap_tiles;
  long long carry = 0;
  for (int64_t base = first; base < end; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const long long count = t < end ? counts[t] : 0;
    long long before, total;
    Scan(scan_storage).ExclusiveSum(count, before, total);
    __syncthreads();
    if (t < end) counts[t] = carry + before;
    carry += total;
  }
  if (threadIdx.x == 0 && carry != layer.k) report_failure(status, m, plan.n_layers, l, kBitmapCountMismatch);
}

// One block per (message, bitmap tile): writes the positions of set bits as entries.
__global__ void bitmap_decode_kernel(const uint8_t* messages, const UnpackLayer* layers, DecodePlan plan,
                                     const long long* tile_prefix, int64_t* indices) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t tile = blockIdx.x, m = blockIdx.y;
  int64_t l, byte;
  uint64_t word;
  bitmap_word_of_thread(messages, layers, plan, tile, m, &l, &byte, &word);
  int before;
  Scan(scan_storage).ExclusiveSum(format::popcount64(word), before);
  const UnpackLayer& layer = layers[l];
  int64_t entry = tile_prefix[m * plan.total_bitmap_tiles + tile] + before;
  int64_t* row = indices + m * plan.total_entries + layer.entry_base;
  for (; word != 0; word &= word - 1u, ++entry) {
    if (entry < layer.k) row[entry] = byte * 8 + format::lowest_set_bit(word);  // k is checked too
  }
}

// ---------------------------------------------------------------------------------------------
// Applying and gathering decoded messages
// ---------------------------------------------------------------------------------------------

template <class Out, class Scale>
__global__ void add_message_kernel(Out* out, const uint8_t* message, const UnpackLayer* layers,
                                   int64_t n_layers, int64_t total_entries, FloatKind value_kind,
                                   const int64_t* row, Scale scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total_entries;
       j += stride) {
    const int64_t l = find_layer(layers, n_layers, j, [](const UnpackLayer& u) { return u.entry_base; });
    const UnpackLayer& layer = layers[l];
    const float value =
        format::load_value(message + layer.section.value_offset, value_kind, j - layer.entry_base);
    format::accumulate_scaled(out + layer.offset + row[j], value, scale);
  }
}

__global__ void gather_entries_kernel(const uint8_t* messages, const UnpackLayer* layers, DecodePlan plan,
                                      FloatKind value_kind, const int64_t* decoded, uint8_t* values,
                                      int64_t* indices) {
  const int64_t m = blockIdx.y;
  const int64_t value_size = format::float_kind_size(value_kind);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < plan.total_entries;
       j += stride) {
    const int64_t l = find_layer(layers, plan.n_layers, j, [](const UnpackLayer& u) { return u.entry_base; });
    const UnpackLayer& layer = layers[l];
    const int64_t entry = m * plan.total_entries + j;
    indices[entry] = layer.offset + decoded[entry];
    const uint8_t* source =
        messages + m * plan.message_bytes + layer.section.value_offset + (j - layer.entry_base) * value_size;
    for (int64_t b = 0; b < value_size; ++b) values[entry * value_size + b] = source[b];
  }
}

}  // namespace (rtc under NVRTC)

// ---------------------------------------------------------------------------------------------
// Launchers (host code; gcomp/native_cupy.py mirrors them launch by launch for NVRTC builds)
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)

size_t topk_pack_workspace_bytes(const PackPlan& plan) {
  return align_up(sizeof(RadixState) * plan.n_layers) +
         align_up(sizeof(unsigned long long) * kRadixBins * plan.n_layers) +
         2 * align_up(sizeof(long long) * plan.total_tiles) + align_up(sizeof(int64_t) * plan.total_entries);
}

cudaError_t launch_topk_pack(FloatKind input_kind, const void* buffer, const PackLayer* layers,
                             const PackPlan& plan, FloatKind value_kind, uint8_t* message, void* workspace,
                             cudaStream_t stream) {
  switch (input_kind) {
    case FloatKind::kFloat32:
      return pack_for_input(static_cast<const float*>(buffer), layers, plan, value_kind, message, workspace, stream);
    case FloatKind::kFloat64:
      return pack_for_input(static_cast<const double*>(buffer), layers, plan, value_kind, message, workspace, stream);
    case FloatKind::kFloat16:
      return pack_for_input(static_cast<const Half16*>(buffer), layers, plan, value_kind, message, workspace, stream);
    default:
      return pack_for_input(static_cast<const BFloat16Bits*>(buffer), layers, plan, value_kind, message, workspace,
                            stream);
  }
}

size_t decode_workspace_bytes(const DecodePlan& plan) {
  return align_up(sizeof(long long) * plan.n_messages * plan.total_bitmap_tiles);
}

cudaError_t launch_decode(const uint8_t* messages, const UnpackLayer* layers, const DecodePlan& plan,
                          int64_t* indices, DecodeStatus* status, void* workspace, cudaStream_t stream) {
  if (plan.n_messages == 0 || plan.n_layers == 0) return cudaGetLastError();
  const unsigned int rows = static_cast<unsigned int>(plan.n_messages);
  if (plan.total_groups > 0) {
    decode_groups_kernel<<<dim3(grid_for(plan.total_groups), rows), kThreads, 0, stream>>>(
        messages, layers, plan, indices, status);
  }
  if (plan.total_bitmap_tiles > 0) {
    long long* tile_counts = static_cast<long long*>(workspace);
    const dim3 tiles(static_cast<unsigned int>(plan.total_bitmap_tiles), rows);
    bitmap_count_kernel<<<tiles, kThreads, 0, stream>>>(messages, layers, plan, tile_counts, status);
    bitmap_scan_kernel<<<dim3(static_cast<unsigned int>(plan.n_layers), rows), kThreads, 0, stream>>>(
        layers, plan, tile_counts, status);
    bitmap_decode_kernel<<<tiles, kThreads, 0, stream>>>(messages, layers, plan, tile_counts, indices);
  }
  return cudaGetLastError();
}

cudaError_t launch_add_message(FloatKind out_kind, void* out, const uint8_t* messages, const UnpackLayer* layers,
                               const DecodePlan& plan, FloatKind value_kind, const int64_t* indices,
                               int64_t message, double scale, cudaStream_t stream) {
  if (plan.total_entries == 0) return cudaGetLastError();
  const uint8_t* bytes = messages + message * plan.message_bytes;
  const int64_t* row = indices + message * plan.total_entries;
  const unsigned int grid = grid_for(plan.total_entries);
  const float scale_float = static_cast<float>(scale);
  switch (out_kind) {
    case FloatKind::kFloat32:
      add_message_kernel<<<grid, kThreads, 0, stream>>>(static_cast<float*>(out), bytes, layers, plan.n_layers,
                                                        plan.total_entries, value_kind, row, scale_float);
      break;
    case FloatKind::kFloat64:
      add_message_kernel<<<grid, kThreads, 0, stream>>>(static_cast<double*>(out), bytes, layers, plan.n_layers,
                                                        plan.total_entries, value_kind, row, scale);
      break;
    case FloatKind::kFloat16:
      add_message_kernel<<<grid, kThreads, 0, stream>>>(static_cast<Half16*>(out), bytes, layers, plan.n_layers,
                                                        plan.total_entries, value_kind, row, scale_float);
      break;
    default:
      add_message_kernel<<<grid, kThreads, 0, stream>>>(static_cast<BFloat16Bits*>(out), bytes, layers,
                                                        plan.n_layers, plan.total_entries, value_kind, row,
                                                        scale_float);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_entries(const uint8_t* messages, const UnpackLayer* layers, const DecodePlan& plan,
                                  FloatKind value_kind, const int64_t* decoded, uint8_t* values, int64_t* indices,
                                  cudaStream_t stream) {
  if (plan.n_messages == 0 || plan.total_entries == 0) return cudaGetLastError();
  gather_entries_kernel<<<dim3(grid_for(plan.total_entries), static_cast<unsigned int>(plan.n_messages)),
                          kThreads, 0, stream>>>(messages, layers, plan, value_kind, decoded, values, indices);
  return cudaGetLastError();
}

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace gcomp
