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
#include <cstring>

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
// SIMD levels
// ---------------------------------------------------------------------------------------------
// The float32 pack runs on one of three code paths, chosen per call: AVX-512 (F, BW, VL, VBMI2
// for the compress instructions, and BMI2), AVX2 (+ BMI2: compress emulated by a permutation
// table), or portable C++ written for the compiler's vectoriser. Every path produces the same
// bytes. The best level the CPU runs is the default; GCOMP_SIMD=avx512|avx2|portable forces one,
// so each path can be tested and timed on any machine able to run it. Each level's code is
// compiled with function target attributes, so the build needs no -m flags and the library loads
// on any x86-64 CPU.
enum class SimdLevel : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kSimdEnv = "GCOMP_SIMD";

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512:
      return "avx512";
    case SimdLevel::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GCOMP_X86_SIMD 1
#endif

bool cpu_supports(SimdLevel level) {
#ifdef GCOMP_X86_SIMD
  switch (level) {
    case SimdLevel::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case SimdLevel::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("popcnt");
    default:
      return true;
  }
#else
  return level == SimdLevel::kPortable;
#endif
}

// The levels this CPU can run, fastest first.
std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> levels;
  for (SimdLevel level : {SimdLevel::kAvx512, SimdLevel::kAvx2, SimdLevel::kPortable}) {
    if (cpu_supports(level)) levels.push_back(level);
  }
  return levels;
}

// The level a call runs at: GCOMP_SIMD if set (read at every call, so tests can switch it),
// else the best the CPU supports. A level the CPU lacks is an error, not a silent fallback: a
// test or benchmark that asked for it must not quietly measure another path.
SimdLevel active_simd_level() {
  const char* env = std::getenv(kSimdEnv);
  const std::string wanted = env == nullptr ? "" : env;
  if (wanted.empty() || wanted == "auto") return supported_simd_levels().front();
  for (SimdLevel level : {SimdLevel::kAvx512, SimdLevel::kAvx2, SimdLevel::kPortable}) {
    if (wanted != simd_level_name(level)) continue;
    TORCH_CHECK_VALUE(cpu_supports(level), kSimdEnv, "=", wanted,
                      ": this CPU lacks the instructions of that level (the best it runs is ",
                      simd_level_name(supported_simd_levels().front()), ")");
    return level;
  }
  TORCH_CHECK_VALUE(false, kSimdEnv, " must be avx512, avx2, portable or auto, not '", wanted, "'");
}

// ---------------------------------------------------------------------------------------------
// topk_pack
// ---------------------------------------------------------------------------------------------
// Per layer, selection is exact and reads the input once:
//  1. A sample of keys brackets the k-th largest key between `low` and `high`.
//  2. One pass over the layer keeps the candidates, the elements with key >= low: their values
//     (compressed, in index order) and one bit per element (a "kept word" per 64 elements). It
//     also keeps the keys inside [low, high] (a few percent of the elements), counts the keys
//     above `high` (all selected) and histograms the bracket keys per chunk.
//  3. The summed histograms narrow the k-th largest key to one bin, whose keys are narrowed
//     further (kth_largest) to find it exactly (`kth`). Ties at kth go to the smallest indices,
//     i.e. to the earliest chunks, which fixes where each chunk's entries start in the message.
//  4. A pass over the candidates takes the keys above kth and the chunk's share of keys equal to
//     it (in index order) and writes values and bitmap words straight into the message. Bit-packed
//     indices go through a list of the selected indices, as their groups of eight straddle chunks.
// If the sample misled the bracket, the layer's scan (step 2) is redone with low = 0 and high = max
// (everything a candidate, every key in the bracket), so the sample only ever affects speed,
// never the result.

// Bins of a chunk's histogram of bracket keys: few, so that a vector loop counts them (one
// compare per bin and 64 keys); settle_layer then narrows the chosen bin itself.
constexpr int kHistogramBins = 16;
// Parts of the chosen bin: collecting its keys sorts them by part (in parallel, per chunk), so
// that settling the layer ranks only the keys of one part.
constexpr int kBinParts = 16;
constexpr int64_t kWordElements = 64;  // elements per kept word (and per bitmap word)
// A layer counts as sparse when fewer than one element in this many is expected to be a
// candidate: its scans then visit the candidates of each word one by one (a loop over the set
// bits, mispredicted once per word or so), which beats appending every vector branch-free (a
// compress per 16 elements) while candidates are this rare. Denser layers run branch-free.
constexpr int64_t kSparseCandidateRatio = 10;
// Lists appended by SIMD code get whole vectors stored (and, later, loaded) past their end.
constexpr int64_t kListSlack = 64;
// Per-thread lists are kept between calls (no fresh pages to fault in) unless larger than this.
constexpr int64_t kArenaKeepBytes = int64_t(64) << 20;

// Growable per-thread storage that outlives a call. Entries before `used` survive growth.
template <class T>
struct Arena {
  std::unique_ptr<T[]> data;
  int64_t capacity = 0;
  int64_t used = 0;

  T* room(int64_t n) {  // at least n writable entries after `used`
    if (used + n > capacity) {
      const int64_t grown = std::max(used + n, 2 * capacity);
      std::unique_ptr<T[]> bigger(new T[static_cast<size_t>(grown)]);
      if (used > 0) std::memcpy(static_cast<void*>(bigger.get()), data.get(), static_cast<size_t>(used) * sizeof(T));
      data = std::move(bigger);
      capacity = grown;
    }
    return data.get() + used;
  }
  void trim() {
    used = 0;
    if (capacity * static_cast<int64_t>(sizeof(T)) > kArenaKeepBytes) {
      data.reset();
      capacity = 0;
    }
  }
};

// One arena per (type, role) and thread.
enum ArenaRole {
  kValueList = 0,
  kKeyList = 1,
  kWordList = 2,
  kSelectedList = 3,
  kPositionList = 4,
  kTakenList = 5,
  kUnpackPositionList = 6
};
template <class T, int kRole>
Arena<T>& thread_arena() {
  static thread_local Arena<T> arena;
  return arena;
}

template <class Key>
struct PackLayerPlan {
  Key low = 0;                                 // candidates: key >= low; bracket: [low, high]
  Key high = std::numeric_limits<Key>::max();  // keys above are selected without ranking
  bool sparse = false;                         // few candidates expected (see kSparseCandidateRatio)
  bool positions = false;                      // the scan also lists each candidate's place in its chunk
  Key top = std::numeric_limits<Key>::max();   // histogram range [low, top]; keys above go to the top bin
  int shift = 0;                               // see histogram_bin
  int64_t first_chunk = 0;
  int64_t n_chunks = 0;
  int64_t need = 0;        // entries to take from the bracket: k minus the keys above `high`
  int bin = -1;            // the bin holding the need-th largest bracket key (-1: need == 0)
  int64_t above_bins = 0;  // bracket keys in bins above `bin`
  Key kth = 0;             // need-th largest bracket key (or `high` when need == 0)
};

// The smallest shift that maps the histogram range [low, top] onto kHistogramBins bins.
template <class Key>
int histogram_shift(const PackLayerPlan<Key>& plan) {
  int shift = 0;
  while (shift < static_cast<int>(8 * sizeof(Key)) - 1 && ((plan.top - plan.low) >> shift) >= kHistogramBins) {
    ++shift;
  }
  return shift;
}

// The histogram bin of a bracket key (key >= low).
template <class Key>
int histogram_bin(Key key, Key low, int shift) {
  return static_cast<int>(std::min<Key>((key - low) >> shift, kHistogramBins - 1));
}

// The first key of the plan's chosen bin (which holds keys up to first + 2^shift - 1, or every
// key above for the top bin).
template <class Key>
Key chosen_bin_first(const PackLayerPlan<Key>& plan) {
  return plan.low + (static_cast<Key>(plan.bin) << plan.shift);
}

// The part of the chosen bin a key of it falls in: kBinParts equal parts of the bin's width (the
// top bin's keys beyond that width share the last one).
inline int bin_part_shift(int shift) { return std::max(0, shift - 4); }  // kBinParts == 1 << 4

// A chunk of a layer. Its lists live in the arenas of the thread that scanned it (`owner`).
template <class Key>
struct PackChunk {
  int64_t layer = 0;
  int64_t begin = 0;  // element range inside the layer
  int64_t end = 0;
  int owner = 0;
  int64_t value_at = 0;  // candidate values: value list [value_at, value_at + n_kept)
  int64_t n_kept = 0;
  int64_t key_at = 0;  // bracket keys, in index order: key list [key_at, key_at + n_bracket)
  int64_t n_bracket = 0;
  int64_t word_at = 0;  // kept words: word list [word_at, word_at + ceil(length / 64))
  int64_t position_at = 0;  // with plan.positions: position list [position_at, position_at + n_kept)
  uint32_t histogram[kHistogramBins];
  std::vector<Key> bin_key;  // bracket keys inside the layer's chosen bin, in index order
  uint32_t part_count[kBinParts] = {};  // bin keys in each part of the bin
  int64_t n_above_high = 0;
  int64_t above_bin = 0;  // bracket keys in bins above the chosen one
  int64_t n_above = 0;    // keys > kth
  int64_t n_equal = 0;    // keys == kth
  int64_t take_equal = 0;
  int64_t out_base = 0;  // first entry of this chunk in the layer's sorted selection
};

// Where each thread's lists are, once all scanning is done.
template <class In, class Key>
struct ListBases {
  std::vector<const In*> values;
  std::vector<const Key*> keys;
  std::vector<const uint64_t*> words;
  std::vector<const uint16_t*> positions;
  explicit ListBases(int threads) : values(threads), keys(threads), words(threads), positions(threads) {}
};

// Records where the calling thread's lists are. Called after each scan loop (the arenas only grow
// while scanning); a barrier must follow before other threads read them.
template <class In, class Key>
void publish_lists(ListBases<In, Key>& bases) {
  const int t = omp_get_thread_num();
  bases.values[t] = thread_arena<In, kValueList>().data.get();
  bases.keys[t] = thread_arena<Key, kKeyList>().data.get();
  bases.words[t] = thread_arena<uint64_t, kWordList>().data.get();
  bases.positions[t] = thread_arena<uint16_t, kPositionList>().data.get();
}

// The keys of `sample` at two ranks of its descending order, rank_low >= rank_high (0-based;
// rank_high < 0: none asked); `largest` is the sample's largest key. A histogram of each key's
// top kRankBits bits (below the highest bit of `largest`) finds the bins that hold the two ranks,
// and only the keys of the bins from one to the other are ordered (nth_element): two branch-free
// passes over the sample and a sort of a few percent of it, where a quickselect over the whole
// sample mispredicts about one branch in two (8 us for both ranks of 4096 keys, against 4 us).
// Keys that all share a bin (data of one magnitude) make that bin the whole sample: then it costs
// what nth_element does.
constexpr int kRankBits = 11;
template <class Key>
void sample_ranks(const std::vector<Key>& sample, Key largest, int64_t rank_low, int64_t rank_high, Key& at_low,
                  Key& at_high) {
  const int64_t n = static_cast<int64_t>(sample.size());
  int width = 0;
  while (width < static_cast<int>(8 * sizeof(Key)) && (largest >> width) != 0) ++width;
  const int shift = std::max(0, width - kRankBits);
  // Two interleaved histograms: runs of keys in one bin (common) would otherwise wait on one
  // counter's store after another.
  uint16_t counts[2][1 << kRankBits];  // a sample has fewer than 2^16 keys
  std::memset(counts, 0, sizeof(counts));
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++counts[0][sample[i] >> shift];
    ++counts[1][sample[i + 1] >> shift];
  }
  if (i < n) ++counts[0][sample[i] >> shift];
  // The bins holding the two ranks, walked down from the largest key's bin; `above`: the keys
  // in the bins above the upper one.
  const int64_t upper_rank = std::max<int64_t>(rank_high, 0);
  int64_t seen = 0, above = 0;
  int64_t bin = static_cast<int64_t>(largest >> shift);
  int64_t upper_bin = bin;
  for (;; --bin) {
    const int64_t count = counts[0][bin] + counts[1][bin];
    if (seen + count <= upper_rank) above = seen + count, upper_bin = bin - 1;
    if (rank_low < seen + count) break;
    seen += count;
  }
  // The keys of bins [bin, upper_bin], gathered without a branch per key.
  static thread_local std::vector<Key> between;
  between.resize(static_cast<size_t>(n));
  const uint64_t span = static_cast<uint64_t>(upper_bin - bin);
  int64_t count = 0;
  for (const Key key : sample) {
    between[count] = key;
    count += static_cast<uint64_t>(static_cast<int64_t>(key >> shift) - bin) <= span;
  }
  const auto first = between.begin();
  std::nth_element(first, first + (rank_low - above), first + count, std::greater<Key>());
  at_low = first[rank_low - above];
  if (rank_high >= 0) {
    std::nth_element(first, first + (rank_high - above), first + (rank_low - above), std::greater<Key>());
    at_high = first[rank_high - above];
  }
}

// A layer's bracket, from a sample of its keys: runs of kSampleRun consecutive elements (one
// cache line) at a fixed stride. Sets the lower end (the candidates' bound) and the sparse flag,
// the upper end and the histogram's top.
template <class In, class Key>
void bracket_from_sample(const In* x, int64_t numel, int64_t k, PackLayerPlan<Key>& plan) {
  plan.high = std::numeric_limits<Key>::max();
  plan.top = plan.high;
  plan.low = 0;
  plan.sparse = false;
  if (numel < kSampleMinNumel) return;
  const int64_t n_runs = std::min<int64_t>(1024, std::max<int64_t>(16, numel / 4096));
  const int64_t n_sample = n_runs * kSampleRun;
  const double expected = static_cast<double>(n_sample) * static_cast<double>(k) / numel;
  const double margin = 3.0 * std::sqrt(expected) + 3.0;
  const int64_t rank_low = static_cast<int64_t>(std::ceil(expected + margin));
  const int64_t rank_high = static_cast<int64_t>(std::floor(expected - margin));
  if (rank_low >= n_sample) return;  // nearly everything is selected: a bracket saves nothing
  const int64_t stride = numel / n_runs;  // >= 2048 > kSampleRun
  static thread_local std::vector<Key> sample;
  sample.resize(static_cast<size_t>(n_sample));
  // The runs are far apart (cache misses each): ask for all of them before reading any.
  for (int64_t r = 0; r < n_runs; ++r) __builtin_prefetch(x + r * stride);
  Key largest[kSampleRun] = {};  // per lane: no chain of dependent maxima
  for (int64_t r = 0; r < n_runs; ++r) {
    for (int64_t i = 0; i < kSampleRun; ++i) {
      const Key key = format::magnitude_key(x[r * stride + i]);
      sample[r * kSampleRun + i] = key;
      largest[i] = std::max(largest[i], key);
    }
  }
  const Key sample_max = *std::max_element(largest, largest + kSampleRun);
  Key high = plan.high;
  sample_ranks(sample, sample_max, rank_low, rank_high, plan.low, high);
  plan.sparse = (rank_low + 1) * kSparseCandidateRatio < n_sample;
  // The histogram spans the sampled keys of the bracket; the few keys above the sample's largest
  // share the top bin (with no upper end from the sample, the top is the sample's largest key).
  if (rank_high >= 0) {
    plan.high = high;
    plan.top = high;
  } else {
    plan.top = sample_max;
  }
}

// Running state of one chunk's scan.
template <class In, class Key>
struct ScanLists {
  In* values;
  Key* keys;
  uint64_t* words;
  uint16_t* positions;  // nullptr unless plan.positions
  int64_t n_kept = 0;
  int64_t n_bracket = 0;
  int64_t n_above_high = 0;
};

// The kept word of x[0, n) (n <= 64): bit t set when magnitude_key(x[t]) >= low. The flags come
// from a loop without dependencies between elements (the compiler turns it into vector compares
// at whatever width the target has); a multiply then gathers each group of eight flag bytes into
// eight bits, instead of 64 dependent shifts and ORs.
template <class In, class Key>
uint64_t kept_word_portable(const In* x, int n, Key low) {
  alignas(8) uint8_t flags[kWordElements];
  for (int t = 0; t < n; ++t) flags[t] = static_cast<uint8_t>(static_cast<Key>(format::magnitude_bits(x[t])) >= low);
  for (int t = n; t < kWordElements; ++t) flags[t] = 0;
  uint64_t word = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (int b = 0; b < kWordElements / 8; ++b) {
    uint64_t eight;  // byte i (0 or 1) is flag 8 b + i
    std::memcpy(&eight, flags + 8 * b, sizeof(eight));
    // Byte i times 2^(56 - 7 i) lands on bit 56 + i; no two products overlap, so no carries.
    word |= ((eight * 0x0102040810204080ull) >> 56) << (8 * b);
  }
#else
  for (int t = 0; t < kWordElements; ++t) word |= static_cast<uint64_t>(flags[t]) << t;
#endif
  return word;
}

// Scans x[first, length) of a chunk (first a multiple of 64), portable code. Each word's kept
// bits come first (kept_word_portable, vectorised). Words with fewer candidates than half their
// elements then copy them by a loop over the set bits (a loop iteration per candidate and about
// one mispredicted exit per word); fuller words run a branch-free loop over every element
// (every value and key stored, the counts advancing only for candidates and bracket keys), which
// is cheaper there. Without a compress instruction the per-element loop costs about five cycles
// an element, so at 10 % density the set-bit loop is several times faster.
template <class In, class Key>
void scan_range_portable(const In* x, int64_t first, int64_t length, const PackLayerPlan<Key>& plan,
                         ScanLists<In, Key>& lists) {
  const Key low = plan.low, high = plan.high;
  int64_t n_kept = lists.n_kept, n_bracket = lists.n_bracket, n_above_high = lists.n_above_high;
  for (int64_t w = first; w < length; w += kWordElements) {
    const int n = static_cast<int>(std::min<int64_t>(kWordElements, length - w));
    const uint64_t word = kept_word_portable(x + w, n, low);
    lists.words[w / kWordElements] = word;
    if (word == 0) continue;
    if (2 * format::popcount64(word) < n) {
      for (uint64_t rest = word; rest != 0; rest &= rest - 1u) {
        const int t = format::lowest_set_bit(rest);
        const In value = x[w + t];
        const Key key = format::magnitude_key(value);
        lists.values[n_kept] = value;
        if (lists.positions != nullptr) lists.positions[n_kept] = static_cast<uint16_t>(w + t);
        ++n_kept;
        lists.keys[n_bracket] = key;
        n_bracket += key <= high;
        n_above_high += key > high;
      }
      continue;
    }
    for (int t = 0; t < n; ++t) {
      const In value = x[w + t];
      const Key key = format::magnitude_key(value);
      const bool kept = (word >> t) & 1u;
      lists.values[n_kept] = value;
      if (lists.positions != nullptr) lists.positions[n_kept] = static_cast<uint16_t>(w + t);
      n_kept += kept;
      lists.keys[n_bracket] = key;
      n_bracket += kept & (key <= high);
      n_above_high += key > high;
    }
  }
  lists.n_kept = n_kept;
  lists.n_bracket = n_bracket;
  lists.n_above_high = n_above_high;
}

#ifdef GCOMP_X86_SIMD
// The keys of 16 float32 values (lanes outside `valid`: 0). The masked min avoids a false GCC 12
// warning that the unmasked form trips.
__attribute__((target("avx512f"))) inline __m512i float32_keys(const float* values, __mmask16 valid) {
  const __m512i magnitude = _mm512_and_si512(_mm512_loadu_si512(values), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_mask_min_epu32(_mm512_setzero_si512(), valid, magnitude,
                               _mm512_set1_epi32(static_cast<int>(format::kNanKeyFloat32)));
}

// The candidates of x[0, length) in whole words of 64 (float32, AVX-512): appends their values
// (and, with kPositions, their places) and stores each word's kept bits; returns the count.
// Lists are appended with a register-form compress and a full store (the memory form is slow on
// some CPUs); the lists have slack for the lanes stored past the count. kSparse layers copy
// their few candidates one by one instead. Each variant is its own loop, so none carries the
// others' registers or tests.
template <bool kSparse, bool kPositions>
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt,bmi,bmi2"))) int64_t append_candidates_avx512(
    const float* x, int64_t length, uint32_t low, float* values, uint64_t* words, uint16_t* positions) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i low_v = _mm512_set1_epi32(static_cast<int>(low));
  // Chunk-relative places of 32 consecutive elements, for the position list.
  __m512i places = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                    12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i place_step = _mm512_set1_epi16(static_cast<short>(kWordElements));
  int64_t n_kept = 0;
  for (int64_t w = 0; w + kWordElements <= length; w += kWordElements) {
    __m512i bits[4];
    __mmask16 kept[4];
    for (int q = 0; q < 4; ++q) {  // |x| bits >= low exactly when the key is (see magnitude_bits)
      bits[q] = _mm512_loadu_si512(x + w + 16 * q);
      kept[q] = _mm512_cmpge_epu32_mask(_mm512_and_si512(bits[q], abs_mask), low_v);
    }
    const uint64_t word =
        _cvtmask64_u64(_mm512_kunpackd(_mm512_kunpackw(kept[3], kept[2]), _mm512_kunpackw(kept[1], kept[0])));
    words[w / kWordElements] = word;
    if constexpr (kSparse) {
      for (uint64_t rest = word; rest != 0; rest &= rest - 1u) {
        const int bit = __builtin_ctzll(rest);
        values[n_kept] = x[w + bit];
        if constexpr (kPositions) positions[n_kept] = static_cast<uint16_t>(w + bit);
        ++n_kept;
      }
    } else {
      if constexpr (kPositions) {
        _mm512_storeu_si512(positions + n_kept,
                            _mm512_maskz_compress_epi16(_cvtu32_mask32(static_cast<uint32_t>(word)), places));
        _mm512_storeu_si512(positions + n_kept + _mm_popcnt_u64(_bzhi_u64(word, 32)),
                            _mm512_maskz_compress_epi16(_cvtu32_mask32(static_cast<uint32_t>(word >> 32)),
                                                        _mm512_add_epi16(places, _mm512_set1_epi16(32))));
        places = _mm512_add_epi16(places, place_step);
      }
      // Where each vector's candidates go, counted from the word (general registers).
      const int64_t at[4] = {n_kept, n_kept + static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 16))),
                             n_kept + static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 32))),
                             n_kept + static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 48)))};
      for (int q = 0; q < 4; ++q) _mm512_storeu_si512(values + at[q], _mm512_maskz_compress_epi32(kept[q], bits[q]));
      n_kept += _mm_popcnt_u64(word);
    }
  }
  return n_kept;
}

// float32 input, AVX-512F, 64 elements per step. Keys are min(|x| bits, NaN key) (see
// sparse_format.h).
__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt,bmi,bmi2"))) void scan_chunk_avx512(
    const float* x, int64_t length, const PackLayerPlan<uint32_t>& plan, ScanLists<float, uint32_t>& lists) {
  const __m512i high_v = _mm512_set1_epi32(static_cast<int>(plan.high));
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);
  float* values = lists.values;
  uint16_t* positions = lists.positions;
  int64_t n_kept = 0;
  if (plan.sparse) {
    n_kept = positions != nullptr ? append_candidates_avx512<true, true>(x, length, plan.low, values, lists.words, positions)
                                  : append_candidates_avx512<true, false>(x, length, plan.low, values, lists.words, nullptr);
  } else {
    n_kept = positions != nullptr ? append_candidates_avx512<false, true>(x, length, plan.low, values, lists.words, positions)
                                  : append_candidates_avx512<false, false>(x, length, plan.low, values, lists.words, nullptr);
  }
  const int64_t w = length / kWordElements * kWordElements;
  // Then the bracket keys among the candidates (few, and still in the L1/L2 cache); every
  // other candidate lies above `high`.
  uint32_t* keys = lists.keys;
  int64_t n_bracket = 0;
  int64_t j = 0;
  for (; j + 32 <= n_kept; j += 32) {  // two groups per step: independent work to overlap
    const __m512i first = float32_keys(values + j, all), second = float32_keys(values + j + 16, all);
    const __mmask16 in_first = _mm512_cmple_epu32_mask(first, high_v);
    const __mmask16 in_second = _mm512_cmple_epu32_mask(second, high_v);
    _mm512_storeu_si512(keys + n_bracket, _mm512_maskz_compress_epi32(in_first, first));
    n_bracket += __builtin_popcount(in_first);
    _mm512_storeu_si512(keys + n_bracket, _mm512_maskz_compress_epi32(in_second, second));
    n_bracket += __builtin_popcount(in_second);
  }
  for (; j < n_kept; j += 16) {
    const int64_t rest = n_kept - j;
    const __mmask16 valid = static_cast<__mmask16>(rest >= 16 ? 0xFFFFu : (1u << rest) - 1u);
    const __m512i key = float32_keys(values + j, valid);
    const __mmask16 in_bracket = _mm512_mask_cmple_epu32_mask(valid, key, high_v);
    _mm512_storeu_si512(keys + n_bracket, _mm512_maskz_compress_epi32(in_bracket, key));
    n_bracket += __builtin_popcount(in_bracket);
  }
  const int64_t n_above_high = n_kept - n_bracket;
  lists.n_kept = n_kept;
  lists.n_bracket = n_bracket;
  lists.n_above_high = n_above_high;
  scan_range_portable(x, w, length, plan, lists);
}

// Collects the keys in [bin_low, bin_high] of keys[0, n) into out (room for the count + 16).
__attribute__((target("avx512f,popcnt"))) int64_t collect_range_avx512(const uint32_t* keys, int64_t n,
                                                                       uint32_t bin_low, uint32_t bin_high,
                                                                       uint32_t* out) {
  const __m512i low_v = _mm512_set1_epi32(static_cast<int>(bin_low));
  const __m512i high_v = _mm512_set1_epi32(static_cast<int>(bin_high));
  int64_t count = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i key = _mm512_loadu_si512(keys + i);
    const __mmask16 in_bin = _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(key, low_v), key, high_v);
    _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(in_bin, key));
    count += __builtin_popcount(in_bin);
  }
  for (; i < n; ++i) {
    out[count] = keys[i];
    count += (keys[i] >= bin_low) & (keys[i] <= bin_high);
  }
  return count;
}

// Bits [cursor, cursor + 64) of the taken stream (16 bits per group of candidates, see below).
inline uint64_t read_taken_window(const uint16_t* taken, int64_t cursor) {
  uint64_t low_bits, high_bits;
  std::memcpy(&low_bits, taken + 4 * (cursor >> 6), sizeof(low_bits));
  std::memcpy(&high_bits, taken + 4 * (cursor >> 6) + 4, sizeof(high_bits));
  const int shift = static_cast<int>(cursor & 63);
  return (low_bits >> shift) | ((high_bits << 1) << (63 - shift));
}
// The next popcount(word) bits of the taken stream, from bit `cursor` on, moved to the positions
// of the word's set bits.
__attribute__((target("bmi2"))) inline uint64_t spread_taken_bits(const uint16_t* taken, int64_t cursor,
                                                                 uint64_t word) {
  return _pdep_u64(read_taken_window(taken, cursor), word);
}

// Writes a chunk's bitmap words from its taken stream (bit j of taken[g]: candidate 16 g + j
// taken, see take_candidates_*): the bits of each kept word's candidates, spread back to their
// element positions with pdep. Branch-free; shared by the AVX-512 and AVX2 levels. taken has room
// for n_groups + 8 entries.
__attribute__((target("popcnt,bmi,bmi2"))) void write_bitmap_from_taken(uint16_t* taken, int64_t n_groups,
                                                                       const uint64_t* words, int64_t chunk_begin,
                                                                       int64_t length, uint8_t* bitmap) {
  std::fill(taken + n_groups, taken + n_groups + 8, uint16_t(0));  // read (and unused) past the end
  const int64_t full_words = length / kWordElements;
  uint8_t* bytes = bitmap + chunk_begin / 8;  // little-endian: a word's bytes are the bitmap's bytes
  int64_t cursor = 0;                         // candidates of the words before b
  int64_t b = 0;
  // Two words per step share one 64-bit window of the stream while their candidates fit in it.
  for (; b + 2 <= full_words; b += 2) {
    const uint64_t first = words[b], second = words[b + 1];
    const int n_first = __builtin_popcountll(first), n_second = __builtin_popcountll(second);
    const uint64_t window = read_taken_window(taken, cursor);
    const uint64_t take_first = _pdep_u64(window, first);
    const uint64_t take_second = n_first + n_second <= 63 ? _pdep_u64(window >> n_first, second)
                                                         : spread_taken_bits(taken, cursor + n_first, second);
    std::memcpy(bytes + 8 * b, &take_first, sizeof(take_first));
    std::memcpy(bytes + 8 * b + 8, &take_second, sizeof(take_second));
    cursor += n_first + n_second;
  }
  for (; b < full_words; ++b) {
    const uint64_t word = words[b];
    const uint64_t take = spread_taken_bits(taken, cursor, word);
    std::memcpy(bytes + 8 * b, &take, sizeof(take));
    cursor += __builtin_popcountll(word);
  }
  if (full_words * kWordElements < length) {  // the layer's last, partial word
    const uint64_t take = spread_taken_bits(taken, cursor, words[full_words]);
    for (int64_t byte = 0; byte < ceil_div(length - full_words * kWordElements, 8); ++byte) {
      bytes[8 * full_words + byte] = static_cast<uint8_t>(take >> (8 * byte));
    }
  }
}

// The element indices (chunk_begin + place) of the taken candidates `t` of a group of 16, stored
// to selected[0, 16) under `stored` (bit i: entry i).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2"))) inline void store_taken_indices(
    const uint16_t* places, __mmask16 t, int64_t chunk_begin, __mmask16 stored, int64_t* selected) {
  const __m512i base = _mm512_set1_epi64(chunk_begin);
  const __m256i picked = _mm256_maskz_compress_epi16(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(places)));
  // (masked widening: the unmasked form trips the same false GCC 12 warning)
  _mm512_mask_storeu_epi64(selected, static_cast<__mmask8>(stored),
                           _mm512_add_epi64(_mm512_maskz_cvtepu16_epi64(0xFF, _mm256_castsi256_si128(picked)), base));
  _mm512_mask_storeu_epi64(selected + 8, static_cast<__mmask8>(stored >> 8),
                           _mm512_add_epi64(_mm512_maskz_cvtepu16_epi64(0xFF, _mm256_extracti128_si256(picked, 1)), base));
}

// The taken candidates of one chunk (float32), 16 at a time: keys above kth, and the first
// ties_left keys equal to it. Their values are compressed and stored from out[position] on, and
// with kSelected their indices too (from the places the scan listed); otherwise each group's
// taken bits go to taken[g]. Stores write whole vectors while the chunk's entries go on past
// them (later stores overwrite the excess) and masked ones near the chunk's end, whose next
// entries belong to another chunk. Whole groups with room run a loop without those masks.
template <bool kSelected>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi,bmi2"))) void take_candidates_avx512(
    const float* candidates, const uint16_t* places, int64_t n_kept, int64_t chunk_begin, uint32_t kth,
    int64_t position, int64_t end_position, int64_t ties_left, float* out, uint16_t* taken, int64_t* selected) {
  const __m512i kth_v = _mm512_set1_epi32(static_cast<int>(kth));
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);
  auto take_ties = [&](__mmask16 t, uint32_t equal) {  // the first ties_left of `equal`, in order
    for (; equal != 0 && ties_left > 0; equal &= equal - 1u, --ties_left) {
      t = static_cast<__mmask16>(t | (equal & (~equal + 1u)));
    }
    return t;
  };
  const int64_t n_groups = ceil_div(n_kept, 16);
  int64_t g = 0;
  for (; 16 * g + 16 <= n_kept && position + 16 <= end_position; ++g) {
    const __m512i v = _mm512_loadu_si512(candidates + 16 * g);
    const __m512i key = float32_keys(candidates + 16 * g, all);
    __mmask16 t = _mm512_cmpgt_epu32_mask(key, kth_v);
    if (ties_left > 0) t = take_ties(t, _mm512_cmpeq_epu32_mask(key, kth_v));
    _mm512_storeu_si512(out + position, _mm512_maskz_compress_epi32(t, v));
    if constexpr (kSelected) {
      store_taken_indices(places + 16 * g, t, chunk_begin, all, selected + position);
    } else {
      taken[g] = t;
    }
    position += __builtin_popcount(t);
  }
  for (; g < n_groups; ++g) {
    const int64_t j = 16 * g;
    const int64_t rest = n_kept - j;
    const __mmask16 valid = static_cast<__mmask16>(rest >= 16 ? 0xFFFFu : (1u << rest) - 1u);
    const __m512i v = _mm512_loadu_si512(candidates + j);
    const __m512i key = float32_keys(candidates + j, valid);
    __mmask16 t = _mm512_mask_cmpgt_epu32_mask(valid, key, kth_v);
    if (ties_left > 0) t = take_ties(t, _mm512_mask_cmpeq_epu32_mask(valid, key, kth_v));
    const __mmask16 head = static_cast<__mmask16>((1u << __builtin_popcount(t)) - 1u);
    _mm512_mask_storeu_epi32(out + position, head, _mm512_maskz_compress_epi32(t, v));
    if constexpr (kSelected) {
      store_taken_indices(places + j, t, chunk_begin, head, selected + position);
    } else {
      taken[g] = t;
    }
    position += __builtin_popcount(t);
  }
}

// Step 4 for float32 values: the taken candidates (see take_candidates_avx512). Bitmap layers
// keep the taken bits as a stream, which a second, branch-free loop spreads back to element
// positions one kept word at a time (pdep).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi,bmi2"))) void emit_chunk_avx512(
    const float* candidates, const uint16_t* places, int64_t n_kept, const uint64_t* words, int64_t chunk_begin,
    int64_t length, uint32_t kth, int64_t position, int64_t end_position, int64_t ties_left, uint8_t* values,
    uint8_t* bitmap, int64_t* selected) {
  float* out = reinterpret_cast<float*>(values);
  const int64_t n_groups = ceil_div(n_kept, 16);
  if (bitmap == nullptr) {
    return take_candidates_avx512<true>(candidates, places, n_kept, chunk_begin, kth, position, end_position,
                                        ties_left, out, nullptr, selected);
  }
  uint16_t* taken = thread_arena<uint16_t, kTakenList>().room(n_groups + 8);  // bit j of taken[g]: 16 g + j taken
  take_candidates_avx512<false>(candidates, places, n_kept, chunk_begin, kth, position, end_position, ties_left, out,
                                taken, nullptr);
  write_bitmap_from_taken(taken, n_groups, words, chunk_begin, length, bitmap);
}
#endif

#ifdef GCOMP_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX2 level (+ BMI2, POPCNT), float32 input: the same steps as the AVX-512 level, 8 lanes per
// vector. AVX2 has no compress instruction; a lane permutation from a 256-entry table (indexed
// by the 8-bit mask, 2 KB, stays in L1) moves the selected lanes to the front, and a full vector
// is stored, the lanes past the count being overwritten by the next store or ignored (the lists
// have kListSlack entries of slack). Keys are below 2^31 (the NaN key is 0x7F800001), so AVX2's
// signed compares order them like unsigned ones.
// ---------------------------------------------------------------------------------------------

// Entry m: the source lane of each destination lane for the lanes set in m, one per byte.
struct CompressTable {
  uint64_t lanes[256];
  constexpr CompressTable() : lanes{} {
    for (int m = 0; m < 256; ++m) {
      uint64_t entry = 0;
      int out = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((m >> lane) & 1) entry |= static_cast<uint64_t>(lane) << (8 * out++);
      }
      lanes[m] = entry;
    }
  }
};
constexpr CompressTable kCompressTable{};

// The lanes of v set in mask (8 bits), moved to the front in order; the other lanes: garbage.
__attribute__((target("avx2"))) inline __m256i compress_epi32_avx2(__m256i v, unsigned mask) {
  const __m256i permutation =
      _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompressTable.lanes[mask])));
  return _mm256_permutevar8x32_epi32(v, permutation);
}

// The same for 8 lanes of 16 bits: the table's lane numbers b become byte shuffles (2 b, 2 b + 1).
__attribute__((target("avx2"))) inline __m128i compress_epi16_avx2(__m128i v, unsigned mask) {
  const __m128i lanes = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(kCompressTable.lanes[mask])));
  const __m128i shuffle = _mm_add_epi16(_mm_mullo_epi16(lanes, _mm_set1_epi16(0x0202)), _mm_set1_epi16(0x0100));
  return _mm_shuffle_epi8(v, shuffle);
}

__attribute__((target("avx2"))) inline __m256i load_epi32_avx2(const void* p) {
  return _mm256_loadu_si256(static_cast<const __m256i*>(p));
}
__attribute__((target("avx2"))) inline void store_epi32_avx2(void* p, __m256i v) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
// The lanes of a compare result as 8 bits.
__attribute__((target("avx2"))) inline unsigned lane_mask_avx2(__m256i compared) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(compared)));
}
// The keys of 8 float32 values given as bits: min(|x| bits, NaN key).
__attribute__((target("avx2"))) inline __m256i float32_keys_avx2(__m256i bits) {
  return _mm256_min_epu32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)),
                          _mm256_set1_epi32(static_cast<int>(format::kNanKeyFloat32)));
}
// A key bound for signed compares: keys never exceed the NaN key, so larger bounds act alike.
inline int32_t signed_key_bound(uint32_t key) { return static_cast<int32_t>(std::min<uint32_t>(key, 0x7FFFFFFFu)); }

// append_candidates_avx512 for AVX2: a kept word from eight compares of 8 lanes, then the
// candidates appended by table compress (or, kSparse, one by one over the word's set bits).
template <bool kSparse, bool kPositions>
__attribute__((target("avx2,popcnt,bmi,bmi2"))) int64_t append_candidates_avx2(
    const float* x, int64_t length, uint32_t low, float* values, uint64_t* words, uint16_t* positions) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  // |x| bits >= low  <=>  |x| bits > low - 1 (signed; low == 0 gives -1, so every lane).
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(low - 1u));
  const __m128i lane_numbers = _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n_kept = 0;
  for (int64_t w = 0; w + kWordElements <= length; w += kWordElements) {
    __m256i bits[8];
    unsigned kept[8];
    uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
      bits[q] = load_epi32_avx2(x + w + 8 * q);
      kept[q] = lane_mask_avx2(_mm256_cmpgt_epi32(_mm256_and_si256(bits[q], abs_mask), below));
      word |= static_cast<uint64_t>(kept[q]) << (8 * q);
    }
    words[w / kWordElements] = word;
    if constexpr (kSparse) {
      for (uint64_t rest = word; rest != 0; rest &= rest - 1u) {
        const int bit = __builtin_ctzll(rest);
        values[n_kept] = x[w + bit];
        if constexpr (kPositions) positions[n_kept] = static_cast<uint16_t>(w + bit);
        ++n_kept;
      }
    } else {
      // Where each vector's candidates go, counted from the word (independent of each other,
      // unlike a running count, so the eight stores need not wait for one another).
      // The eight compressed vectors are formed before any is stored: in a profile with each
      // table load after the previous store, the time gathered at those loads.
      __m256i packed[8];
      for (int q = 0; q < 8; ++q) packed[q] = compress_epi32_avx2(bits[q], kept[q]);
      for (int q = 0; q < 8; ++q) {
        const int64_t at = n_kept + static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, static_cast<unsigned>(8 * q))));
        store_epi32_avx2(values + at, packed[q]);
        if constexpr (kPositions) {
          const __m128i places = _mm_add_epi16(lane_numbers, _mm_set1_epi16(static_cast<short>(w + 8 * q)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(positions + at), compress_epi16_avx2(places, kept[q]));
        }
      }
      n_kept += _mm_popcnt_u64(word);
    }
  }
  return n_kept;
}

// scan_chunk_avx512 for AVX2.
__attribute__((target("avx2,popcnt,bmi,bmi2"))) void scan_chunk_avx2(const float* x, int64_t length,
                                                                    const PackLayerPlan<uint32_t>& plan,
                                                                    ScanLists<float, uint32_t>& lists) {
  float* values = lists.values;
  uint16_t* positions = lists.positions;
  int64_t n_kept = 0;
  if (plan.sparse) {
    n_kept = positions != nullptr ? append_candidates_avx2<true, true>(x, length, plan.low, values, lists.words, positions)
                                  : append_candidates_avx2<true, false>(x, length, plan.low, values, lists.words, nullptr);
  } else {
    n_kept = positions != nullptr ? append_candidates_avx2<false, true>(x, length, plan.low, values, lists.words, positions)
                                  : append_candidates_avx2<false, false>(x, length, plan.low, values, lists.words, nullptr);
  }
  const int64_t w = length / kWordElements * kWordElements;
  // The bracket keys among the candidates (still in cache); the others lie above `high`.
  const __m256i high_v = _mm256_set1_epi32(signed_key_bound(plan.high));
  uint32_t* keys = lists.keys;
  int64_t n_bracket = 0, j = 0;
  for (; j + 16 <= n_kept; j += 16) {  // two vectors per step: independent work to overlap
    const __m256i first = float32_keys_avx2(load_epi32_avx2(values + j));
    const __m256i second = float32_keys_avx2(load_epi32_avx2(values + j + 8));
    const unsigned in_first = ~lane_mask_avx2(_mm256_cmpgt_epi32(first, high_v)) & 0xFFu;
    const unsigned in_second = ~lane_mask_avx2(_mm256_cmpgt_epi32(second, high_v)) & 0xFFu;
    store_epi32_avx2(keys + n_bracket, compress_epi32_avx2(first, in_first));
    n_bracket += _mm_popcnt_u32(in_first);
    store_epi32_avx2(keys + n_bracket, compress_epi32_avx2(second, in_second));
    n_bracket += _mm_popcnt_u32(in_second);
  }
  for (; j < n_kept; ++j) {
    const uint32_t key = format::magnitude_key(values[j]);
    keys[n_bracket] = key;
    n_bracket += key <= plan.high;
  }
  lists.n_kept = n_kept;
  lists.n_bracket = n_bracket;
  lists.n_above_high = n_kept - n_bracket;
  scan_range_portable(x, w, length, plan, lists);
}

// collect_range_avx512 for AVX2 (out: room for the count + 16).
__attribute__((target("avx2,popcnt"))) int64_t collect_range_avx2(const uint32_t* keys, int64_t n, uint32_t bin_low,
                                                                  uint32_t bin_high, uint32_t* out) {
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(bin_low - 1u));  // bin_low <= NaN key
  const __m256i high_v = _mm256_set1_epi32(signed_key_bound(bin_high));
  int64_t count = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i key = load_epi32_avx2(keys + i);
    const unsigned in_bin =
        lane_mask_avx2(_mm256_cmpgt_epi32(key, below)) & ~lane_mask_avx2(_mm256_cmpgt_epi32(key, high_v)) & 0xFFu;
    store_epi32_avx2(out + count, compress_epi32_avx2(key, in_bin));
    count += _mm_popcnt_u32(in_bin);
  }
  for (; i < n; ++i) {
    out[count] = keys[i];
    count += (keys[i] >= bin_low) & (keys[i] <= bin_high);
  }
  return count;
}

// The taken candidates `t` (16 bits) of a group of 16 as element indices chunk_begin + place,
// stored to selected[0, popcount(t) + 8) (entries past the count are garbage).
__attribute__((target("avx2,popcnt"))) inline void store_taken_indices_avx2(const uint16_t* places, unsigned t,
                                                                            int64_t chunk_begin, int64_t* selected) {
  const __m256i base = _mm256_set1_epi64x(chunk_begin);
  const unsigned halves[2] = {t & 0xFFu, t >> 8};
  int64_t at = 0;
  for (int h = 0; h < 2; ++h) {
    const __m128i eight = _mm_loadu_si128(reinterpret_cast<const __m128i*>(places + 8 * h));
    const __m256i picked = compress_epi32_avx2(_mm256_cvtepu16_epi32(eight), halves[h]);
    store_epi32_avx2(selected + at, _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(picked)), base));
    store_epi32_avx2(selected + at + 4,
                     _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(picked, 1)), base));
    at += _mm_popcnt_u32(halves[h]);
  }
}

// The first ties_left set bits of `equal`, added to t (in index order); ties_left counts down.
inline unsigned take_first_ties(unsigned t, unsigned equal, int64_t& ties_left) {
  for (; equal != 0 && ties_left > 0; equal &= equal - 1u, --ties_left) t |= equal & (~equal + 1u);
  return t;
}

// take_candidates_avx512 for AVX2: groups of 16 candidates (two vectors), so that the taken
// stream has the same layout and write_bitmap_from_taken serves both levels. Groups whose
// full-vector stores stay inside the chunk's entries run vector code; the last few run scalar
// code with exact stores (the entries after end_position belong to another chunk and thread).
template <bool kSelected>
__attribute__((target("avx2,popcnt,bmi,bmi2"))) void take_candidates_avx2(
    const float* candidates, const uint16_t* places, int64_t n_kept, int64_t chunk_begin, uint32_t kth,
    int64_t position, int64_t end_position, int64_t ties_left, float* out, uint16_t* taken, int64_t* selected) {
  const __m256i kth_v = _mm256_set1_epi32(signed_key_bound(kth));
  const int64_t n_groups = ceil_div(n_kept, 16);
  int64_t g = 0;
  for (; 16 * g + 16 <= n_kept && position + 16 <= end_position; ++g) {
    const __m256i first = load_epi32_avx2(candidates + 16 * g);
    const __m256i second = load_epi32_avx2(candidates + 16 * g + 8);
    const __m256i first_key = float32_keys_avx2(first), second_key = float32_keys_avx2(second);
    unsigned t = lane_mask_avx2(_mm256_cmpgt_epi32(first_key, kth_v)) |
                 (lane_mask_avx2(_mm256_cmpgt_epi32(second_key, kth_v)) << 8);
    if (ties_left > 0) {
      const unsigned equal = lane_mask_avx2(_mm256_cmpeq_epi32(first_key, kth_v)) |
                             (lane_mask_avx2(_mm256_cmpeq_epi32(second_key, kth_v)) << 8);
      t = take_first_ties(t, equal, ties_left);
    }
    const unsigned low_half = t & 0xFFu;
    store_epi32_avx2(out + position, compress_epi32_avx2(first, low_half));
    store_epi32_avx2(out + position + _mm_popcnt_u32(low_half), compress_epi32_avx2(second, t >> 8));
    if constexpr (kSelected) {
      store_taken_indices_avx2(places + 16 * g, t, chunk_begin, selected + position);
    } else {
      taken[g] = static_cast<uint16_t>(t);
    }
    position += _mm_popcnt_u32(t);
  }
  for (; g < n_groups; ++g) {
    const int64_t j = 16 * g;
    const int rest = static_cast<int>(std::min<int64_t>(16, n_kept - j));
    unsigned t = 0, equal = 0;
    for (int i = 0; i < rest; ++i) {
      const uint32_t key = format::magnitude_key(candidates[j + i]);
      t |= static_cast<unsigned>(key > kth) << i;
      equal |= static_cast<unsigned>(key == kth) << i;
    }
    if (ties_left > 0) t = take_first_ties(t, equal, ties_left);
    for (unsigned left = t; left != 0; left &= left - 1u) {
      const int i = __builtin_ctz(left);
      out[position] = candidates[j + i];
      if constexpr (kSelected) selected[position] = chunk_begin + places[j + i];
      ++position;
    }
    if constexpr (!kSelected) taken[g] = static_cast<uint16_t>(t);
  }
}

// emit_chunk_avx512 for AVX2.
__attribute__((target("avx2,popcnt,bmi,bmi2"))) void emit_chunk_avx2(
    const float* candidates, const uint16_t* places, int64_t n_kept, const uint64_t* words, int64_t chunk_begin,
    int64_t length, uint32_t kth, int64_t position, int64_t end_position, int64_t ties_left, uint8_t* values,
    uint8_t* bitmap, int64_t* selected) {
  float* out = reinterpret_cast<float*>(values);
  if (bitmap == nullptr) {
    return take_candidates_avx2<true>(candidates, places, n_kept, chunk_begin, kth, position, end_position, ties_left,
                                      out, nullptr, selected);
  }
  const int64_t n_groups = ceil_div(n_kept, 16);
  uint16_t* taken = thread_arena<uint16_t, kTakenList>().room(n_groups + 8);
  take_candidates_avx2<false>(candidates, places, n_kept, chunk_begin, kth, position, end_position, ties_left, out,
                              taken, nullptr);
  write_bitmap_from_taken(taken, n_groups, words, chunk_begin, length, bitmap);
}

// histogram_keys_avx512 for AVX2: 32 keys per step, their bins packed into the bytes of one
// vector (in a shuffled order, which counting ignores), then one compare per bin.
__attribute__((target("avx2,popcnt"))) void histogram_keys_avx2(const uint32_t* keys, int64_t n, uint32_t low,
                                                                int shift, uint32_t* counts) {
  const __m256i low_v = _mm256_set1_epi32(static_cast<int>(low));
  const __m256i last_bin = _mm256_set1_epi32(kHistogramBins - 1);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  uint64_t totals[kHistogramBins] = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256i bins[4];
    for (int q = 0; q < 4; ++q) {
      const __m256i offset = _mm256_sub_epi32(load_epi32_avx2(keys + j + 8 * q), low_v);
      bins[q] = _mm256_min_epu32(_mm256_srl_epi32(offset, shift_v), last_bin);
    }
    const __m256i packed =
        _mm256_packus_epi16(_mm256_packus_epi32(bins[0], bins[1]), _mm256_packus_epi32(bins[2], bins[3]));
    for (int b = 0; b < kHistogramBins; ++b) {
      totals[b] += _mm_popcnt_u32(static_cast<unsigned>(
          _mm256_movemask_epi8(_mm256_cmpeq_epi8(packed, _mm256_set1_epi8(static_cast<char>(b))))));
    }
  }
  for (; j < n; ++j) ++totals[histogram_bin(keys[j], low, shift)];
  for (int b = 0; b < kHistogramBins; ++b) counts[b] = static_cast<uint32_t>(totals[b]);
}
#endif

// bins[i] = histogram_bin(keys[i]) for i < n, a loop the compiler vectorises.
template <class Key>
void histogram_bins(const Key* keys, int64_t n, Key low, int shift, uint8_t* bins) {
  for (int64_t i = 0; i < n; ++i) bins[i] = static_cast<uint8_t>(histogram_bin(keys[i], low, shift));
}

#ifdef GCOMP_X86_SIMD
// histogram_keys for 32-bit keys, 64 per step: their bins packed into the bytes of one vector,
// then one compare per bin, whose mask bits are counted.
__attribute__((target("avx512f,avx512bw,popcnt"))) void histogram_keys_avx512(const uint32_t* keys, int64_t n,
                                                                             uint32_t low, int shift,
                                                                             uint32_t* counts) {
  const __m512i low_v = _mm512_set1_epi32(static_cast<int>(low));
  const __m512i last_bin = _mm512_set1_epi32(kHistogramBins - 1);
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  uint64_t totals[kHistogramBins] = {};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m128i packed[4];
    for (int q = 0; q < 4; ++q) {
      const __m512i offset = _mm512_sub_epi32(_mm512_loadu_si512(keys + j + 16 * q), low_v);
      packed[q] = _mm512_cvtepi32_epi8(_mm512_min_epu32(_mm512_srl_epi32(offset, shift_v), last_bin));
    }
    __m512i bins = _mm512_castsi128_si512(packed[0]);
    bins = _mm512_inserti32x4(bins, packed[1], 1);
    bins = _mm512_inserti32x4(bins, packed[2], 2);
    bins = _mm512_inserti32x4(bins, packed[3], 3);
    for (int b = 0; b < kHistogramBins; ++b) {
      totals[b] += _mm_popcnt_u64(_cvtmask64_u64(_mm512_cmpeq_epi8_mask(bins, _mm512_set1_epi8(static_cast<char>(b)))));
    }
  }
  for (; j < n; ++j) ++totals[histogram_bin(keys[j], low, shift)];
  for (int b = 0; b < kHistogramBins; ++b) counts[b] = static_cast<uint32_t>(totals[b]);
}
#endif

// counts[b] = number of keys[0, n) in histogram bin b. Long lists get their bins computed a
// block at a time (vectorised), then counted into four interleaved histograms; at the SIMD
// levels (32-bit keys) a vector loop counts them.
template <class Key>
void histogram_keys(const Key* keys, int64_t n, Key low, int shift, uint32_t* counts, SimdLevel level) {
#ifdef GCOMP_X86_SIMD
  if constexpr (std::is_same_v<Key, uint32_t>) {
    if (level == SimdLevel::kAvx512) return histogram_keys_avx512(keys, n, low, shift, counts);
    if (level == SimdLevel::kAvx2) return histogram_keys_avx2(keys, n, low, shift, counts);
  }
#endif
  (void)level;
  std::fill(counts, counts + kHistogramBins, 0u);
  if (n < 4 * kHistogramBins) {
    for (int64_t j = 0; j < n; ++j) ++counts[histogram_bin(keys[j], low, shift)];
    return;
  }
  constexpr int64_t kBlock = 256;
  uint32_t partial[4][kHistogramBins] = {};
  uint8_t bins[kBlock];
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) {
    histogram_bins(keys + j, kBlock, low, shift, bins);
    for (int64_t i = 0; i < kBlock; i += 4) {
      ++partial[0][bins[i]];
      ++partial[1][bins[i + 1]];
      ++partial[2][bins[i + 2]];
      ++partial[3][bins[i + 3]];
    }
  }
  for (; j < n; ++j) ++partial[0][histogram_bin(keys[j], low, shift)];
  for (int b = 0; b < kHistogramBins; ++b) counts[b] = partial[0][b] + partial[1][b] + partial[2][b] + partial[3][b];
}

// Step 2 for one chunk: fills the chunk's candidate, bracket key and kept word lists in the calling
// thread's arenas, and histograms the bracket keys.
template <class In, class Key>
void scan_chunk(const In* layer, const PackLayerPlan<Key>& plan, PackChunk<Key>& chunk, SimdLevel level) {
  Arena<In>& value_arena = thread_arena<In, kValueList>();
  Arena<Key>& key_arena = thread_arena<Key, kKeyList>();
  Arena<uint64_t>& word_arena = thread_arena<uint64_t, kWordList>();
  Arena<uint16_t>& position_arena = thread_arena<uint16_t, kPositionList>();
  const int64_t length = chunk.end - chunk.begin;
  const int64_t n_words = ceil_div(length, kWordElements);
  ScanLists<In, Key> lists{value_arena.room(length + kListSlack), key_arena.room(length + kListSlack),
                           word_arena.room(n_words),
                           plan.positions ? position_arena.room(length + kListSlack) : nullptr};
  const In* x = layer + chunk.begin;
#ifdef GCOMP_X86_SIMD
  if constexpr (std::is_same_v<In, float>) {
    if (level == SimdLevel::kAvx512) {
      scan_chunk_avx512(x, length, plan, lists);
    } else if (level == SimdLevel::kAvx2) {
      scan_chunk_avx2(x, length, plan, lists);
    } else {
      scan_range_portable(x, 0, length, plan, lists);
    }
  } else {
    scan_range_portable(x, 0, length, plan, lists);
  }
#else
  scan_range_portable(x, 0, length, plan, lists);
#endif
  chunk.owner = omp_get_thread_num();
  chunk.value_at = value_arena.used;
  chunk.n_kept = lists.n_kept;
  chunk.key_at = key_arena.used;
  chunk.n_bracket = lists.n_bracket;
  chunk.word_at = word_arena.used;
  chunk.position_at = position_arena.used;
  chunk.n_above_high = lists.n_above_high;
  value_arena.used += lists.n_kept;
  key_arena.used += lists.n_bracket;
  word_arena.used += n_words;
  if (plan.positions) position_arena.used += lists.n_kept;
  histogram_keys(lists.keys, lists.n_bracket, plan.low, histogram_shift(plan), chunk.histogram, level);
}

// The bin of the summed histograms that holds the need-th largest bracket key.
template <class Key>
void choose_bin(PackLayerPlan<Key>& plan, const PackChunk<Key>* chunks) {
  plan.bin = -1;
  plan.above_bins = 0;
  if (plan.need <= 0) return;
  int64_t counts[kHistogramBins] = {};
  for (int64_t c = plan.first_chunk; c < plan.first_chunk + plan.n_chunks; ++c) {
    for (int b = 0; b < kHistogramBins; ++b) counts[b] += chunks[c].histogram[b];
  }
  int64_t above = 0;
  int bin = kHistogramBins - 1;
  for (; bin > 0 && above + counts[bin] < plan.need; --bin) above += counts[bin];
  plan.bin = bin;
  plan.above_bins = above;
}

// Appends the keys in [lowest, highest] of keys[0, n) to out (room for the count + 16), in order;
// returns the count. Vector code at the SIMD levels (32-bit keys), else a branch-free loop.
template <class Key>
int64_t collect_range(const Key* keys, int64_t n, Key lowest, Key highest, Key* out, SimdLevel level) {
#ifdef GCOMP_X86_SIMD
  if constexpr (std::is_same_v<Key, uint32_t>) {
    if (level == SimdLevel::kAvx512) return collect_range_avx512(keys, n, lowest, highest, out);
    if (level == SimdLevel::kAvx2) return collect_range_avx2(keys, n, lowest, highest, out);
  }
#endif
  (void)level;
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    out[count] = keys[j];
    count += (keys[j] >= lowest) & (keys[j] <= highest);
  }
  return count;
}

// The keys of the plan's chosen bin form [chosen_bin_first, chosen_bin_last].
template <class Key>
Key chosen_bin_last(const PackLayerPlan<Key>& plan) {
  return plan.bin == kHistogramBins - 1 ? std::numeric_limits<Key>::max()
                                        : static_cast<Key>(chosen_bin_first(plan) + ((static_cast<Key>(1) << plan.shift) - 1));
}

// A chunk's bracket keys in the chosen bin (in index order), how many of them fall in each part
// of the bin, and how many bracket keys lie in the bins above it. The parts are counted by the
// scan's vector histogram (a part is a histogram bin of the chosen bin's range), not sorted into:
// a counting sort's two scalar passes cost more than all the rest of this step, and settle_layer
// picks out the one part it needs with a vector loop.
static_assert(kBinParts == kHistogramBins, "bin parts are counted by histogram_keys");
template <class In, class Key>
void collect_bin(const PackLayerPlan<Key>& plan, const ListBases<In, Key>& bases, PackChunk<Key>& chunk,
                 SimdLevel level) {
  chunk.bin_key.clear();
  chunk.above_bin = 0;
  std::fill(chunk.part_count, chunk.part_count + kBinParts, 0u);
  if (plan.bin < 0) return;
  for (int b = plan.bin + 1; b < kHistogramBins; ++b) chunk.above_bin += chunk.histogram[b];
  if (chunk.histogram[plan.bin] == 0) return;
  const Key bin_first = chosen_bin_first(plan);
  const Key* keys = bases.keys[chunk.owner] + chunk.key_at;
  chunk.bin_key.resize(chunk.histogram[plan.bin] + 16);
  const int64_t count = collect_range(keys, chunk.n_bracket, bin_first, chosen_bin_last(plan), chunk.bin_key.data(), level);
  chunk.bin_key.resize(static_cast<size_t>(count));
  histogram_keys(chunk.bin_key.data(), count, bin_first, bin_part_shift(plan.shift), chunk.part_count, level);
}

// The rank-th largest (0-based) of keys, which it reorders. Large inputs are first narrowed by
// histograms of their spread, so the final nth_element sees few keys however they cluster.
template <class Key>
Key kth_largest(std::vector<Key>& keys, int64_t rank) {
  constexpr size_t kDirect = 512;
  constexpr int kSelectBins = 256;
  while (keys.size() > kDirect) {
    const auto [min_it, max_it] = std::minmax_element(keys.begin(), keys.end());
    const Key lo = *min_it, hi = *max_it;
    if (lo == hi) return lo;
    int shift = 0;
    while (((hi - lo) >> shift) >= kSelectBins) ++shift;
    int64_t counts[kSelectBins] = {};
    for (const Key key : keys) ++counts[(key - lo) >> shift];
    int bin = kSelectBins - 1;
    for (; rank >= counts[bin]; --bin) rank -= counts[bin];
    size_t kept = 0;
    for (const Key key : keys) {
      keys[kept] = key;
      kept += static_cast<int>((key - lo) >> shift) == bin;
    }
    keys.resize(kept);
  }
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<Key>());
  return keys[rank];
}

// Finds the exact threshold and hands out positions: ties at the threshold go to the smallest
// indices, i.e. to the earliest chunks. With need == 0 every key above `high` (and nothing else)
// is taken.
template <class Key>
void settle_layer(PackLayerPlan<Key>& plan, PackChunk<Key>* chunks, SimdLevel level) {
  PackChunk<Key>* first = chunks + plan.first_chunk;
  PackChunk<Key>* last = first + plan.n_chunks;
  plan.kth = plan.high;
  if (plan.need > 0) {
    int64_t rank = plan.need - plan.above_bins - 1;  // among the chosen bin's keys
    int64_t sizes[kBinParts] = {};
    for (PackChunk<Key>* c = first; c != last; ++c) {
      for (int p = 0; p < kBinParts; ++p) sizes[p] += c->part_count[p];
    }
    int part = kBinParts - 1;
    for (; rank >= sizes[part]; --part) rank -= sizes[part];
    // The part's keys, a key range, picked out of every chunk's bin keys.
    const int part_shift = bin_part_shift(plan.shift);
    const Key part_first = chosen_bin_first(plan) + (static_cast<Key>(part) << part_shift);
    const Key part_last = part == kBinParts - 1 ? chosen_bin_last(plan)
                                                : static_cast<Key>(part_first + ((static_cast<Key>(1) << part_shift) - 1));
    std::vector<Key> in_part(static_cast<size_t>(sizes[part] + 16));
    int64_t count = 0;
    for (PackChunk<Key>* c = first; c != last; ++c) {
      count += collect_range(c->bin_key.data(), static_cast<int64_t>(c->bin_key.size()), part_first, part_last,
                             in_part.data() + count, level);
    }
    in_part.resize(static_cast<size_t>(count));
    plan.kth = kth_largest(in_part, rank);
  }
  int64_t bracket_above = 0;  // bracket keys above kth: taken, like every key above `high`
  for (PackChunk<Key>* c = first; c != last; ++c) {
    c->n_above = c->n_above_high;
    c->n_equal = 0;
    if (plan.need > 0) {
      // Keys of the bins above the chosen one lie above kth; of the chosen bin's, some do.
      int64_t above = c->above_bin, equal = 0;
      for (const Key key : c->bin_key) {
        above += key > plan.kth;
        equal += key == plan.kth;
      }
      c->n_above += above;
      c->n_equal = equal;
      bracket_above += above;
    }
  }
  int64_t ties_left = plan.need - bracket_above;  // 0 when need == 0
  int64_t position = 0;
  for (PackChunk<Key>* c = first; c != last; ++c) {
    c->take_equal = std::min(c->n_equal, ties_left);
    ties_left -= c->take_equal;
    c->out_base = position;
    position += c->n_above + c->take_equal;
  }
}

// Step 4, portable: walks a chunk's kept words and candidates in index order.
// No branch depends on whether a candidate is taken (taken or not is data, as unpredictable as
// the input): each candidate is stored at the next free entry, which only advances when it is
// taken, so a skipped candidate's store is overwritten by the next taken one. The store is held
// back only at end_position, whose entry belongs to the next chunk (and perhaps another thread).
template <class In, class Key>
void emit_chunk_portable(const In* candidates, const uint64_t* words, int64_t chunk_begin, int64_t length,
                         Key kth, int64_t position, int64_t end_position, int64_t ties_left, FloatKind value_kind,
                         uint8_t* values, uint8_t* bitmap, int64_t* selected) {
  const int64_t value_size = format::float_kind_size(value_kind);
  for (int64_t first = 0; first < length; first += kWordElements) {
    uint64_t take = 0;
    for (uint64_t rest = words[first / kWordElements]; rest != 0; rest &= rest - 1u, ++candidates) {
      const In value = *candidates;
      const Key key = format::magnitude_key(value);
      const bool tie = (key == kth) & (ties_left > 0);
      const bool taken = (key > kth) | tie;
      ties_left -= tie;
      if (position < end_position) {
        format::store_value(values + position * value_size, value_kind, value);
        if (selected != nullptr) selected[position] = chunk_begin + first + format::lowest_set_bit(rest);
      }
      position += taken;
      take |= (rest & (~rest + 1u)) & (uint64_t(0) - static_cast<uint64_t>(taken));
    }
    if (bitmap != nullptr) {
      uint8_t* bytes = bitmap + (chunk_begin + first) / 8;  // chunk_begin and first: multiples of 64
      const int64_t n_bytes = std::min<int64_t>(8, ceil_div(length - first, 8));
      for (int64_t byte = 0; byte < n_bytes; ++byte) bytes[byte] = static_cast<uint8_t>(take >> (8 * byte));
    }
  }
}

// Writes a chunk's selected values (and bitmap words, or indices to `selected` for bit-packing)
// in ascending index order: keys above kth, and the first take_equal keys equal to it.
template <class In, class Key>
void emit_chunk(const PackChunk<Key>& chunk, const PackLayerPlan<Key>& plan, const ListBases<In, Key>& bases,
                const LayerSection& section, FloatKind value_kind, uint8_t* message, int64_t* selected,
                SimdLevel level) {
  uint8_t* values = message + section.value_offset;
  uint8_t* bitmap = section.bitmap ? message + section.index_offset : nullptr;
  int64_t* layer_selected = section.bitmap ? nullptr : selected;
  const In* candidates = bases.values[chunk.owner] + chunk.value_at;
  const uint64_t* words = bases.words[chunk.owner] + chunk.word_at;
  const int64_t length = chunk.end - chunk.begin;
#ifdef GCOMP_X86_SIMD
  if constexpr (std::is_same_v<In, float>) {
    if (level != SimdLevel::kPortable && value_kind == FloatKind::kFloat32) {
      const uint16_t* places = plan.positions ? bases.positions[chunk.owner] + chunk.position_at : nullptr;
      if (bitmap != nullptr || places != nullptr) {
        auto emit = level == SimdLevel::kAvx512 ? emit_chunk_avx512 : emit_chunk_avx2;
        return emit(candidates, places, chunk.n_kept, words, chunk.begin, length, plan.kth, chunk.out_base,
                    chunk.out_base + chunk.n_above + chunk.take_equal, chunk.take_equal, values, bitmap,
                    layer_selected);
      }
    }
  }
#endif
  (void)level;
  emit_chunk_portable(candidates, words, chunk.begin, length, plan.kth, chunk.out_base,
                      chunk.out_base + chunk.n_above + chunk.take_equal, chunk.take_equal,
                      value_kind, values, bitmap, layer_selected);
}

// The last step, in parallel units: groups of eight sorted indices of a bit-packed layer (each
// group owns `bits` whole bytes), and the padding of each layer's sections, which the unit with
// first_group == 0 zeroes. Every other byte of the message is written by emit_chunk.
struct FinishUnit {
  int64_t layer;
  int64_t first_group;
  int64_t end_group;
};
constexpr int64_t kGroupsPerUnit = 128;

std::vector<FinishUnit> finish_units(const BucketLayout& layout) {
  std::vector<FinishUnit> units;
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    const int64_t groups = layout.sections[l].bitmap ? 0 : ceil_div(layout.ks[l], format::kIndexGroup);
    int64_t first = 0;
    do {
      units.push_back({l, first, std::min(groups, first + kGroupsPerUnit)});
      first += kGroupsPerUnit;
    } while (first < groups);
  }
  return units;
}

void finish_unit(const FinishUnit& unit, const BucketLayout& layout, const int64_t* selected, uint8_t* message) {
  const LayerSection& section = layout.sections[unit.layer];
  const int64_t k = layout.ks[unit.layer];
  if (unit.first_group == 0) {
    const int64_t value_payload = k * format::float_kind_size(layout.value_kind);
    std::memset(message + section.value_offset + value_payload, 0,
                static_cast<size_t>(section.value_bytes - value_payload));
    std::memset(message + section.index_offset + section.index_payload_bytes, 0,
                static_cast<size_t>(section.index_bytes - section.index_payload_bytes));
  }
  if (unit.end_group == unit.first_group) return;
  const int bits = section.bits;
  uint8_t* out = message + section.index_offset + unit.first_group * bits;
  const int64_t first = unit.first_group * format::kIndexGroup;
  const int64_t last = std::min(k, unit.end_group * format::kIndexGroup);
#if defined(__SIZEOF_INT128__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  // Consecutive groups are consecutive bytes, so the unit is one bit stream.
  if (bits <= 32) {
    // Indices go into a 64-bit accumulator whose low 32 bits are stored after every index and
    // kept (the accumulator shifted on) once complete: no branch per index. Stores run up to 4
    // bytes past the unit's stream, so they go to a staging buffer first.
    uint8_t staging[kGroupsPerUnit * 32 + 16];
    uint8_t* cursor = staging;
    uint64_t pending = 0;
    int pending_bits = 0;
    for (int64_t j = first; j < last; ++j) {
      pending |= static_cast<uint64_t>(selected[j]) << pending_bits;
      pending_bits += bits;
      std::memcpy(cursor, &pending, 4);
      const int full = pending_bits >> 5;  // 0 or 1
      cursor += 4 * full;
      pending >>= 32 * full;
      pending_bits -= 32 * full;
    }
    std::memcpy(cursor, &pending, sizeof(pending));
    std::memcpy(out, staging, static_cast<size_t>(ceil_div((last - first) * bits, 8)));
    return;
  }
  // Wider indices (up to 56 bits) go into a 128-bit accumulator, flushed 64 bits at a time.
  unsigned __int128 pending = 0;
  int pending_bits = 0;
  for (int64_t j = first; j < last; ++j) {
    pending |= static_cast<unsigned __int128>(static_cast<uint64_t>(selected[j])) << pending_bits;
    pending_bits += bits;
    if (pending_bits >= 64) {
      const uint64_t word = static_cast<uint64_t>(pending);
      std::memcpy(out, &word, sizeof(word));
      out += sizeof(word);
      pending >>= 64;
      pending_bits -= 64;
    }
  }
  for (int byte = 0; byte < (pending_bits + 7) / 8; ++byte) out[byte] = static_cast<uint8_t>(pending >> (8 * byte));
#else
  for (int64_t j = first; j < last; j += format::kIndexGroup) {
    const int count = static_cast<int>(std::min<int64_t>(format::kIndexGroup, last - j));
    format::pack_index_group(selected + j, count, bits, out + (j - first) / format::kIndexGroup * bits);
  }
#endif
}

template <class In>
void topk_pack_kernel(const In* buffer, const BucketLayout& layout, uint8_t* message, SimdLevel level) {
  using Key = typename format::KeyOf<In>::type;
  const int64_t n_layers = layout.n_layers();
  int64_t work = 0;
  for (const int64_t numel : layout.numels) work += numel;
  const int threads = thread_count(work);

  std::vector<PackLayerPlan<Key>> plans(n_layers);
  int64_t n_chunks = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    plans[l].first_chunk = n_chunks;
    plans[l].n_chunks = ceil_div(layout.numels[l], kChunkElements);
    n_chunks += plans[l].n_chunks;
    plans[l].positions = level != SimdLevel::kPortable && std::is_same_v<In, float> && layout.value_kind == FloatKind::kFloat32 &&
                         !layout.sections[l].bitmap;
  }
  std::vector<PackChunk<Key>> chunks(static_cast<size_t>(n_chunks));
  for (int64_t l = 0; l < n_layers; ++l) {
    for (int64_t c = 0; c < plans[l].n_chunks; ++c) {
      PackChunk<Key>& chunk = chunks[plans[l].first_chunk + c];
      chunk.layer = l;
      chunk.begin = c * kChunkElements;
      chunk.end = std::min(layout.numels[l], chunk.begin + kChunkElements);
    }
  }
  auto layer_data = [&](int64_t l) { return buffer + layout.offsets[l]; };

  std::vector<char> redo(static_cast<size_t>(n_chunks), 0);  // chunks of layers whose bracket failed
  // Indices of bit-packed layers wait here until a layer's chunks have all been emitted
  // (bitmap layers never touch their part).
  Arena<int64_t>& selected_arena = thread_arena<int64_t, kSelectedList>();
  int64_t* selected = selected_arena.room(layout.total_entries());
  ListBases<In, Key> bases(threads);
  bool any_redo = false;
  const std::vector<FinishUnit> units = finish_units(layout);

  // The steps below, run by every thread of a team (the worksharing loops split the work) or, for
  // small calls, by the calling thread alone: outside a parallel region the same loops run
  // whole, without the team's barriers (each of which costs a system call).
  auto steps = [&]() {
    const int team = omp_get_num_threads();
    auto first_chunk_of = [&](int t) { return n_chunks * t / team; };
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < n_layers; ++l) bracket_from_sample(layer_data(l), layout.numels[l], layout.ks[l], plans[l]);
    // Scan and write-out split the chunks alike (a contiguous run per thread), so each thread
    // reads back the lists it wrote, and the message entries it writes are contiguous too.
    const int thread = omp_get_thread_num();
    const int64_t my_first_chunk = first_chunk_of(thread);
    const int64_t my_end_chunk = first_chunk_of(thread + 1);
    for (int64_t c = my_first_chunk; c < my_end_chunk; ++c) {
      const int64_t l = chunks[c].layer;
      scan_chunk(layer_data(l), plans[l], chunks[c], level);
    }
    publish_lists(bases);
#pragma omp barrier
#pragma omp single
    {
      // Check each bracket; a misled one is widened to everything and its layer scanned again.
      for (int64_t l = 0; l < n_layers; ++l) {
        PackLayerPlan<Key>& plan = plans[l];
        plan.shift = histogram_shift(plan);
        int64_t n_above_high = 0, n_bracket = 0;
        for (int64_t c = plan.first_chunk; c < plan.first_chunk + plan.n_chunks; ++c) {
          n_above_high += chunks[c].n_above_high;
          n_bracket += chunks[c].n_bracket;
        }
        plan.need = layout.ks[l] - n_above_high;
        if (plan.need < 0 || plan.need > n_bracket) {
          plan.low = 0;
          plan.high = std::numeric_limits<Key>::max();
          plan.top = plan.high;
          plan.sparse = false;
          plan.shift = histogram_shift(plan);
          plan.need = layout.ks[l];
          std::fill(redo.begin() + plan.first_chunk, redo.begin() + plan.first_chunk + plan.n_chunks, 1);
          any_redo = true;
        } else {
          choose_bin(plan, chunks.data());
        }
      }
    }
    if (any_redo) {  // the same value in every thread: it was set before the barrier of `single`
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < n_chunks; ++c) {
        if (!redo[c]) continue;
        const int64_t l = chunks[c].layer;
        scan_chunk(layer_data(l), plans[l], chunks[c], level);
      }
      publish_lists(bases);
#pragma omp for schedule(dynamic, 1)
      for (int64_t l = 0; l < n_layers; ++l) {
        if (redo[plans[l].first_chunk]) choose_bin(plans[l], chunks.data());
      }
    }
    // Each thread collects from the key lists it scanned (still in its caches).
    for (int64_t c = my_first_chunk; c < my_end_chunk; ++c) collect_bin(plans[chunks[c].layer], bases, chunks[c], level);
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < n_layers; ++l) settle_layer(plans[l], chunks.data(), level);
    for (int64_t c = my_first_chunk; c < my_end_chunk; ++c) {
      const int64_t l = chunks[c].layer;
      emit_chunk(chunks[c], plans[l], bases, layout.sections[l], layout.value_kind, message,
                 selected + layout.entry_base[l], level);
    }
#pragma omp barrier
    // Each unit is packed by the thread that wrote (most of) its indices: the one whose run of
    // chunks holds the unit's first entry.
    auto first_entry_of = [&](int t) {
      const int64_t c = first_chunk_of(t);
      return c < n_chunks ? layout.entry_base[chunks[c].layer] + chunks[c].out_base : layout.total_entries();
    };
    const int64_t my_first_entry = first_entry_of(thread);
    const int64_t my_end_entry = first_entry_of(thread + 1);
    for (const FinishUnit& unit : units) {
      // (Every layer has an entry, k >= 1, so the ranges of the threads cover every unit once.)
      const int64_t entry = layout.entry_base[unit.layer] + unit.first_group * format::kIndexGroup;
      if (entry >= my_first_entry && entry < my_end_entry) {
        finish_unit(unit, layout, selected + layout.entry_base[unit.layer], message);
      }
    }
    thread_arena<In, kValueList>().trim();
    thread_arena<Key, kKeyList>().trim();
    thread_arena<uint64_t, kWordList>().trim();
    thread_arena<uint16_t, kPositionList>().trim();
    thread_arena<uint16_t, kTakenList>().trim();
  };
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    steps();
  } else {
    steps();
  }
  selected_arena.trim();
}

at::Tensor topk_pack_cpu(const at::Tensor& buffer, c10::IntArrayRef offsets,
                         c10::IntArrayRef numels, c10::IntArrayRef ks, c10::ScalarType value_dtype) {
  constexpr const char* op = "gcomp.topk_pack";
  check_pack_args(op, buffer);
  const BucketLayout layout =
      make_bucket_layout(op, offsets, numels, ks, value_dtype, buffer.numel());
  // Not cleared: the kernel writes every byte, padding included.
  at::Tensor message = at::empty({layout.message_bytes}, buffer.options().dtype(at::kByte));
  uint8_t* out = message.data_ptr<uint8_t>();
  const void* data = buffer.const_data_ptr();
  const SimdLevel level = active_simd_level();
  switch (buffer.scalar_type()) {
    case at::kFloat:
      topk_pack_kernel(static_cast<const float*>(data), layout, out, level);
      break;
    case at::kDouble:
      topk_pack_kernel(static_cast<const double*>(data), layout, out, level);
      break;
    case at::kHalf:
      topk_pack_kernel(static_cast<const Half16*>(data), layout, out, level);
      break;
    default:
      topk_pack_kernel(static_cast<const BFloat16Bits*>(data), layout, out, level);
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

// Work of a decode or unpack, in thread_count's units (elements a pack scans): every entry, plus
// a scan of every bitmap. An entry costs about as much as kEntryWork scanned elements (a decoded
// index and a read-modify-write of a cold cache line against a compare per element), so an unpack
// of a few ten thousand entries already gets a second thread.
constexpr int64_t kEntryWork = 8;
int64_t decode_work(const BucketLayout& layout, int64_t n_messages) {
  int64_t per_message = kEntryWork * layout.total_entries();
  for (int64_t l = 0; l < layout.n_layers(); ++l) {
    if (layout.sections[l].bitmap) per_message += layout.numels[l] / 8;
  }
  return n_messages * per_message;
}

// format::unpack_index_group for the CPU: a whole group is read as eight 64-bit windows (one per
// index, at most 56 bits + a 7-bit offset) instead of byte by byte. The windows run up to 8 bytes
// past the group, so groups that close to `end` (the message's end) take the byte-wise decoder.
inline void decode_index_group(const uint8_t* in, int count, int bits, int64_t* indices, const uint8_t* end) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (count == format::kIndexGroup && in + (format::kIndexGroup - 1) * bits / 8 + 8 <= end) {
    const uint64_t mask = (uint64_t(1) << bits) - 1u;
    for (int t = 0; t < format::kIndexGroup; ++t) {
      const int first_bit = t * bits;
      uint64_t window;
      std::memcpy(&window, in + first_bit / 8, sizeof(window));
      indices[t] = static_cast<int64_t>((window >> (first_bit % 8)) & mask);
    }
    return;
  }
#endif
  format::unpack_index_group(in, count, bits, indices);
}

// The set bits of bitmap bytes [0, n_bytes). The SIMD levels (whose CPUs all have it) count each
// word with the popcnt instruction; the portable build's popcount64 takes a dozen instructions,
// which made counting the bitmaps a sixth of a dense unpack.
#ifdef GCOMP_X86_SIMD
__attribute__((target("popcnt"))) int64_t bitmap_popcount_hw(const uint8_t* bytes, int64_t n_bytes) {
  int64_t count = 0, byte = 0;
  for (; byte + 8 <= n_bytes; byte += 8) count += _mm_popcnt_u64(format::load_bitmap_word(bytes + byte, 8));
  if (byte < n_bytes) count += _mm_popcnt_u64(format::load_bitmap_word(bytes + byte, static_cast<int>(n_bytes - byte)));
  return count;
}
#endif
int64_t bitmap_popcount(const uint8_t* bytes, int64_t n_bytes, SimdLevel level) {
#ifdef GCOMP_X86_SIMD
  if (level != SimdLevel::kPortable) return bitmap_popcount_hw(bytes, n_bytes);
#endif
  (void)level;
  int64_t count = 0;
  for (int64_t byte = 0; byte < n_bytes; byte += 8) {
    count += format::popcount64(format::load_bitmap_word(bytes + byte, static_cast<int>(std::min<int64_t>(8, n_bytes - byte))));
  }
  return count;
}

ValidatedMessages validate_messages(const char* op, const uint8_t* bytes, int64_t n_messages,
                                    const BucketLayout& layout, SimdLevel level) {
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
      const int64_t count = bitmap_popcount(payload + unit.begin / 8, end_byte - unit.begin / 8, level);
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
      decode_index_group(payload + (first / format::kIndexGroup) * section.bits, count, section.bits, group,
                         bytes + (unit.message + 1) * layout.message_bytes);
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
      decode_index_group(payload + g * section.bits, count, section.bits, group,
                         validated.message(m, layout.message_bytes) + layout.message_bytes);
      decoded_group = g;
    }
    visit(j, group[j % format::kIndexGroup]);
  }
}

// ---------------------------------------------------------------------------------------------
// sparse_unpack_add_
// ---------------------------------------------------------------------------------------------

#ifdef GCOMP_X86_SIMD
// Adding a bitmap layer's float32 entries into float32 output: for a run of output elements the
// entries of every message are expanded to their element positions, multiplied by the scale and
// added in registers, message 0, 1, 2, ... in turn, and the run is stored once. Lane by lane these
// are the IEEE operations of format::accumulate_scaled (a multiply rounded to float, then an add;
// no FMA), in the same message order, so the sums are bitwise identical; lanes a message has no
// entry for are left alone (masked adds and blends). accumulate_scaled turns every NaN sum into
// the canonical quiet NaN; here that happens once, after the last message, on the lanes any
// message added to: a NaN stays NaN through later adds, so the result is the same, and each add
// depends on the previous one through its latency only.
// A dense layer thus costs a few vector operations per 8 or 16 elements and message instead of a
// loop iteration, a mispredicted branch and a load and store of the output per entry.
constexpr int kMessagesAtOnce = 8;

// One span's elements [begin, end) of one layer (begin a multiple of 64), messages
// [0, n_messages) (at most kMessagesAtOnce): bitmaps[m] is message m's bitmap of the layer,
// values[m] its entries from the span's first one on. out: the layer's output at `begin`.
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt,bmi,bmi2"))) void add_bitmap_span_avx512(
    float* out, const uint8_t* const* bitmaps, const float* const* values, int n_messages, int64_t begin,
    int64_t end, float scale) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 quiet_nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000));
  int64_t consumed[kMessagesAtOnce] = {};
  for (int64_t w = begin; w < end; w += kWordElements) {
    const int n_bytes = static_cast<int>(std::min<int64_t>(8, ceil_div(end - w, 8)));
    uint64_t words[kMessagesAtOnce];
    uint64_t any = 0;
    for (int m = 0; m < n_messages; ++m) {
      words[m] = format::load_bitmap_word(bitmaps[m] + w / 8, n_bytes);
      any |= words[m];
    }
    // The four vectors of the word are independent chains: the adds of one overlap the others'.
    __m512 acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(any >> (16 * q)), out + (w - begin) + 16 * q);
    for (int m = 0; m < n_messages; ++m) {
      const uint64_t word = words[m];
      const float* entries = values[m] + consumed[m];
      // Where each vector's entries start, counted from the word, not one after the other.
      const int64_t at[5] = {0, _mm_popcnt_u64(word & 0xFFFFu), _mm_popcnt_u64(word & 0xFFFFFFFFu),
                             _mm_popcnt_u64(word & 0xFFFFFFFFFFFFull), _mm_popcnt_u64(word)};
      for (int q = 0; q < 4; ++q) {
        const __mmask16 mine = static_cast<__mmask16>(word >> (16 * q));
        // Loaded (masked: nothing past the entries is read), then expanded in registers (the
        // memory form of the expand is several times slower on Zen 4).
        const __mmask16 head = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(at[q + 1] - at[q])));
        const __m512 packed = _mm512_maskz_loadu_ps(head, entries + at[q]);
        acc[q] = _mm512_mask_add_ps(acc[q], mine, acc[q], _mm512_mul_ps(_mm512_maskz_expand_ps(mine, packed), scale_v));
      }
      consumed[m] += at[4];
    }
    for (int q = 0; q < 4; ++q) {
      // Masked stores: lanes without entries (also those past the layer's end) are not touched.
      const __mmask16 touched = static_cast<__mmask16>(any >> (16 * q));
      const __mmask16 nan = _mm512_mask_cmp_ps_mask(touched, acc[q], acc[q], _CMP_UNORD_Q);
      _mm512_mask_storeu_ps(out + (w - begin) + 16 * q, touched, _mm512_mask_mov_ps(acc[q], nan, quiet_nan));
    }
  }
}

// Entry m: for each lane set in m, the number of set lanes below it (the entry it takes), one
// per byte: the inverse of CompressTable.
struct ExpandTable {
  uint64_t lanes[256];
  constexpr ExpandTable() : lanes{} {
    for (int m = 0; m < 256; ++m) {
      uint64_t entry = 0;
      int taken = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if ((m >> lane) & 1) entry |= static_cast<uint64_t>(taken++) << (8 * lane);
      }
      lanes[m] = entry;
    }
  }
};
constexpr ExpandTable kExpandTable{};

// Bits 8 group .. 8 group + 7 of a 32-bit word (broadcast to every lane of `half`) moved to the
// sign bits of lanes 0..7: what blendv reads. One shift per vector, where testing each lane's bit
// takes a broadcast, an and and a compare.
__attribute__((target("avx2"))) inline __m256 word_lanes_to_sign(__m256i half, int group) {
  const __m256i counts = _mm256_sub_epi32(_mm256_set1_epi32(31 - 8 * group), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_sllv_epi32(half, counts));
}

// The AVX2 form: 8 lanes, expanded by a table permutation. Entries are loaded as full vectors
// and the output loaded and stored whole, so a word runs this way only where all its 64 elements
// lie inside the layer and every message has 8 entries to spare past the word's; other words go
// entry by entry (message by message, which keeps each element's order).
__attribute__((target("avx2,popcnt,bmi,bmi2"))) void add_bitmap_span_avx2(float* out, const uint8_t* const* bitmaps,
                                                                 const float* const* values,
                                                                 const int64_t* n_values, int n_messages,
                                                                 int64_t begin, int64_t end, float scale) {
  const __m256 scale_v = _mm256_set1_ps(scale);
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  int64_t consumed[kMessagesAtOnce] = {};
  for (int64_t w = begin; w < end; w += kWordElements) {
    const int n_bytes = static_cast<int>(std::min<int64_t>(8, ceil_div(end - w, 8)));
    uint64_t words[kMessagesAtOnce];
    bool vector = end - w >= kWordElements;
    for (int m = 0; m < n_messages; ++m) {
      words[m] = format::load_bitmap_word(bitmaps[m] + w / 8, n_bytes);
      vector = vector && n_values[m] - consumed[m] >= kWordElements + 8;
    }
    float* o = out + (w - begin);
    if (!vector) {
      for (int m = 0; m < n_messages; ++m) {
        for (uint64_t rest = words[m]; rest != 0; rest &= rest - 1u) {
          format::accumulate_scaled(o + format::lowest_set_bit(rest), values[m][consumed[m]++], scale);
        }
      }
      continue;
    }
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_loadu_ps(o + 8 * q);
    uint64_t any = 0;
    for (int m = 0; m < n_messages; ++m) {
      const uint64_t word = words[m];
      any |= word;
      const float* entries = values[m] + consumed[m];
      const __m256i halves[2] = {_mm256_set1_epi32(static_cast<int>(word)), _mm256_set1_epi32(static_cast<int>(word >> 32))};
      for (int q = 0; q < 8; ++q) {
        const unsigned mine = static_cast<unsigned>(word >> (8 * q)) & 0xFFu;
        // Where the vector's entries start, counted from the word, not one after the other.
        const int64_t at = _mm_popcnt_u64(_bzhi_u64(word, static_cast<unsigned>(8 * q)));
        const __m256i permutation =
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kExpandTable.lanes[mine])));
        const __m256 expanded = _mm256_permutevar8x32_ps(_mm256_loadu_ps(entries + at), permutation);
        const __m256 selected = word_lanes_to_sign(halves[q / 4], q % 4);
        acc[q] = _mm256_blendv_ps(acc[q], _mm256_add_ps(acc[q], _mm256_mul_ps(expanded, scale_v)), selected);
      }
      consumed[m] += _mm_popcnt_u64(word);
    }
    const __m256i touched[2] = {_mm256_set1_epi32(static_cast<int>(any)), _mm256_set1_epi32(static_cast<int>(any >> 32))};
    for (int q = 0; q < 8; ++q) {
      // blendv reads sign bits only: the NaN compare's all-ones lanes and the touched lanes' signs.
      const __m256 touched_nan = _mm256_and_ps(_mm256_cmp_ps(acc[q], acc[q], _CMP_UNORD_Q), word_lanes_to_sign(touched[q / 4], q % 4));
      _mm256_storeu_ps(o + 8 * q, _mm256_blendv_ps(acc[q], quiet_nan, touched_nan));
    }
  }
}
#endif

template <FloatKind kValueKind, class Out, class Scale>
void add_messages(Out* out, const ValidatedMessages& validated, const BucketLayout& layout,
                  Scale scale, SimdLevel level) {
  const std::vector<ElementSpan> spans = element_spans(layout, validated.ranges);
  const int64_t n_spans = static_cast<int64_t>(spans.size());
  int64_t longest_span = 1;
  for (const ElementSpan& span : spans) longest_span = std::max(longest_span, span.end - span.begin);
#pragma omp parallel num_threads(thread_count(decode_work(layout, validated.n_messages)))
  {
    // The entries of one (span, message): positions relative to the span start. Collected first
    // so the scattered read-modify-writes can be prefetched ahead; at low density nearly every
    // entry touches its own cold cache line. Per-thread storage kept between calls: a fresh
    // allocation of this size is an mmap, and its pages fault in again at every call.
    uint32_t* positions = thread_arena<uint32_t, kUnpackPositionList>().room(longest_span);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_spans; ++u) {
      const ElementSpan& span = spans[u];
      Out* span_out = out + layout.offsets[span.layer] + span.begin;
      const LayerSection& section = layout.sections[span.layer];
      for (int64_t m = 0; m < validated.n_messages; ++m) {  // fixed order: identical sums everywhere
        const uint8_t* values = validated.message(m, layout.message_bytes) + section.value_offset;
#ifdef GCOMP_X86_SIMD
        if constexpr (kValueKind == FloatKind::kFloat32 && std::is_same_v<Out, float>) {
          if (section.bitmap && level != SimdLevel::kPortable) {
            if (m % kMessagesAtOnce != 0) continue;  // done with the batch of messages starting at m - m % 8
            const int batch = static_cast<int>(std::min<int64_t>(kMessagesAtOnce, validated.n_messages - m));
            const uint8_t* bitmaps[kMessagesAtOnce];
            const float* entries[kMessagesAtOnce];
            int64_t n_entries[kMessagesAtOnce];
            for (int b = 0; b < batch; ++b) {
              const uint8_t* message = validated.message(m + b, layout.message_bytes);
              const int64_t first =
                  validated.first_entry[(m + b) * static_cast<int64_t>(validated.ranges.size()) + span.first_range];
              bitmaps[b] = message + section.index_offset;
              entries[b] = reinterpret_cast<const float*>(message + section.value_offset) + first;
              n_entries[b] = layout.ks[span.layer] - first;
            }
            if (level == SimdLevel::kAvx512) {
              add_bitmap_span_avx512(span_out, bitmaps, entries, batch, span.begin, span.end, scale);
            } else {
              add_bitmap_span_avx2(span_out, bitmaps, entries, n_entries, batch, span.begin, span.end, scale);
            }
            continue;
          }
        }
#endif
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
    thread_arena<uint32_t, kUnpackPositionList>().trim();
  }
  (void)level;
}

template <class Out, class Scale>
void add_messages_for_value_kind(Out* out, const ValidatedMessages& validated,
                                 const BucketLayout& layout, Scale scale, SimdLevel level) {
  switch (layout.value_kind) {
    case FloatKind::kFloat32:
      add_messages<FloatKind::kFloat32>(out, validated, layout, scale, level);
      break;
    case FloatKind::kFloat16:
      add_messages<FloatKind::kFloat16>(out, validated, layout, scale, level);
      break;
    default:
      add_messages<FloatKind::kBFloat16>(out, validated, layout, scale, level);
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
  const SimdLevel level = active_simd_level();
  const int64_t n_messages = check_messages(op, messages_in, layout);
  if (n_messages == 0 || layout.n_layers() == 0) return;
  const at::Tensor messages = messages_in.contiguous();
  const ValidatedMessages validated =
      validate_messages(op, messages.const_data_ptr<uint8_t>(), n_messages, layout, level);
  void* data = out.data_ptr();
  switch (out.scalar_type()) {
    case at::kFloat:
      add_messages_for_value_kind(static_cast<float*>(data), validated, layout,
                                  static_cast<float>(scale), level);
      break;
    case at::kDouble:
      add_messages_for_value_kind(static_cast<double*>(data), validated, layout, scale, level);
      break;
    case at::kHalf:
      add_messages_for_value_kind(static_cast<Half16*>(data), validated, layout,
                                  static_cast<float>(scale), level);
      break;
    default:
      add_messages_for_value_kind(static_cast<BFloat16Bits*>(data), validated, layout,
                                  static_cast<float>(scale), level);
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
      validate_messages(op, messages.const_data_ptr<uint8_t>(), n_messages, layout, active_simd_level());
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

// The active SIMD level as an integer (0 portable, 1 AVX2, 2 AVX-512), for the quantize kernels
// (quantize_ops.cpp), so that one GCOMP_SIMD switch governs every native CPU kernel.
int current_simd_level() { return static_cast<int>(active_simd_level()); }

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
// only reports the SIMD levels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def(
      "simd_level", []() { return std::string(gcomp::simd_level_name(gcomp::active_simd_level())); },
      "The SIMD level the kernels run at now: avx512, avx2 or portable (GCOMP_SIMD if set, else the best this "
      "CPU supports). Raises ValueError when GCOMP_SIMD names a level this CPU cannot run.");
  module.def(
      "supported_simd_levels",
      []() {
        std::vector<std::string> names;
        for (gcomp::SimdLevel level : gcomp::supported_simd_levels()) names.emplace_back(gcomp::simd_level_name(level));
        return names;
      },
      "The SIMD levels this CPU can run, fastest first (each can be forced with GCOMP_SIMD).");
}
