// C++ CPU kernels of the nested (block-lower-triangular) convolution.
//
// 1×1 convolutions and linear layers (stride 1, no padding) are a product over pixels:
// Y[p, o] = Σ_c X[p, c] · W[o, c]. Pixels are cut into tiles; each tile of the input is packed
// pixel-major into a per-thread buffer that stays in L2 (a transpose for channels_last, a copy
// per channel for NCHW), every destination group of the tile is computed by the register-blocked
// micro-kernels of pixel_major_kernels.h — whose reduction loops visit only the source channels
// in the block mask — and the result is unpacked into the output (bias added on the way). Tiles
// run in parallel. No copy of the whole input, no masked copy of the weight.
//
// In channels_last (float32, AVX-512) the forward, grad_input and grad_weight of a 1×1 run instead
// on the channels-minor kernels of channels_minor.h (vectors along channels, no transpose) when
// prefers_channels_minor says they are the cheaper; see docs/kernels_cpu.md for the measurements.
//
// Other convolutions (k×k, strided) run per output group on ATen (oneDNN) convolutions of weight
// and input views.

#include "nested_conv_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "channels_minor.h"
#include "pixel_major.h"

namespace rdn {
namespace cpu {
namespace {

namespace pm = pixel_major;
namespace cm = channels_minor;

// A strided 2-D view (rows = pixels, cols = channels); one stride is 1 in the layouts we take.
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, row_stride, col_stride;

  Matrix block(int64_t row, int64_t num_rows, int64_t col, int64_t num_cols) const {
    return {data + row * row_stride + col * col_stride, num_rows, num_cols, row_stride, col_stride};
  }
};

// Pixels × channels of a (N, C, H, W) tensor, contiguous in NCHW or NHWC. When every operand is
// NHWC the samples are contiguous in pixels and the batch is one matrix of N·H·W rows.
template <typename T>
struct PixelMatrix {
  T* data;
  int64_t samples, rows, cols, sample_stride, row_stride, col_stride;

  static PixelMatrix of(const at::Tensor& t) {
    T* data = t.data_ptr<std::remove_const_t<T>>();
    const int64_t pixels = t.size(2) * t.size(3);
    if (pixels == 1) {  // (N, C, 1, 1), e.g. a linear layer: the batch is the pixel dimension
      return {data, 1, t.size(0), t.size(1), t.size(0) * t.stride(0), t.stride(0), t.stride(1)};
    }
    // Pixel p = h·W + w steps by stride(3) in both contiguous layouts (by stride(2) when W = 1).
    const int64_t pixel_stride = t.size(3) > 1 ? t.stride(3) : t.stride(2);
    return {data, t.size(0), pixels, t.size(1), t.stride(0), pixel_stride, t.stride(1)};
  }
  bool flattenable() const { return samples <= 1 || (sample_stride == rows * row_stride && row_stride != 1); }
  PixelMatrix flattened() const { return {data, 1, samples * rows, cols, samples * rows * row_stride, row_stride, col_stride}; }
  Matrix<T> sample(int64_t n) const { return {data + n * sample_stride, rows, cols, row_stride, col_stride}; }
};

template <typename A, typename B>
void flatten_together(PixelMatrix<A>& a, PixelMatrix<B>& b) {
  if (a.flattenable() && b.flattenable()) {
    a = a.flattened();
    b = b.flattened();
  }
}

template <typename T>
const pm::Kernels<T>& kernels();
template <>
const pm::Kernels<float>& kernels<float>() { return pm::float_kernels(); }
template <>
const pm::Kernels<double>& kernels<double>() { return pm::double_kernels(); }

// How many parts (threads) to split `total` rows into: one per thread, at most one per `multiple` rows.
int64_t thread_slots(int64_t total, int64_t multiple) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (total + multiple - 1) / multiple));
}

// Rows [begin, end) of part `part` of `parts` over [0, total): as equal as whole multiples of
// `multiple` allow. One part per thread: at::parallel_for hands each thread a contiguous run of
// tasks, so equal tiles that do not divide evenly leave threads idle (9 tiles of 96 rows on two
// threads, a 7×7 layer at batch 16: 480 rows against 304, the second thread idle 37 % of the time).
std::pair<int64_t, int64_t> balanced_range(int64_t total, int64_t parts, int64_t part, int64_t multiple) {
  auto boundary = [&](int64_t p) {
    if (p >= parts) return total;
    return std::min(total, (total * p / parts + multiple / 2) / multiple * multiple);
  };
  return {boundary(part), boundary(part + 1)};
}

// Pixel tiling of a problem reading and writing `channels` values per pixel: one slot per thread
// (balanced_range), each cut into tiles of at most `rows` rows. Tiles run over the batch's pixels
// as one range, so a tile may span samples (short images waste no padding).
struct Tiling {
  int64_t total, multiple;
  int64_t rows;   // the largest tile: a multiple of the kernels' pixel vector pair
  int64_t slots;  // one per thread
  // Elements between a packed tile's channel rows: `rows` rounded up to an odd number of 64-byte
  // lines. The kernels read one line of many channel rows at the same pixel offset; with a stride
  // of an even number of lines those lines fall into a fraction of the L1 / L2 sets (640 floats:
  // a period of 8 rows, so 144 channels needed 18 ways of 8 sets) and a stage ran 2× slower.
  int64_t stride;

  Tiling(int64_t total_rows, int64_t channels, int64_t element_size, int64_t pixel_multiple)
      : total(total_rows), multiple(pixel_multiple) {
    constexpr int64_t kTileBytes = 384 * 1024;  // both packed tiles in a core's L2 (1–2 MB)
    slots = thread_slots(total, multiple);
    const int64_t slot_rows = (total + slots - 1) / slots;
    rows = kTileBytes / std::max<int64_t>(channels * element_size, 1);
    rows = std::max(std::min(rows, slot_rows + multiple) / multiple * multiple, multiple);
    const int64_t per_line = std::max<int64_t>(64 / element_size, 1);
    const int64_t lines = (rows + per_line - 1) / per_line;
    stride = (lines | 1) * per_line;
  }

  std::pair<int64_t, int64_t> slot_range(int64_t slot) const { return balanced_range(total, slots, slot, multiple); }
};

// Calls visit(block, offset) for the pieces of global rows [row, row + count) of `matrix`, one
// per sample they touch; `offset` is the piece's first row within the tile.
template <typename T, typename Visit>
void for_each_piece(const PixelMatrix<T>& matrix, int64_t row, int64_t count, int64_t cols, int64_t col0,
                    Visit&& visit) {
  int64_t offset = 0;
  while (offset < count) {
    const int64_t n = (row + offset) / matrix.rows, local = (row + offset) % matrix.rows;
    const int64_t rows = std::min(count - offset, matrix.rows - local);
    visit(matrix.sample(n).block(local, rows, col0, cols), offset);
    offset += rows;
  }
}

// buffer[c][p] = source[p][c] for a (pixels × channels) block; rows of `buffer` are `padded` apart.
template <typename T>
void pack_tile(const Matrix<const T>& source, T* buffer, int64_t padded) {
  if (source.row_stride == 1) {  // NCHW: each channel is a contiguous run of pixels
    for (int64_t c = 0; c < source.cols; ++c) {
      std::memcpy(buffer + c * padded, source.data + c * source.col_stride, source.rows * sizeof(T));
    }
  } else {  // NHWC: a transpose
    kernels<T>().transpose(source.data, source.row_stride, source.rows, source.cols, buffer, padded, nullptr);
  }
}

// The smallest output the kernels write with non-temporal stores: 16 MB, half this
// machine's 32 MB last-level cache (an output that large evicts most of it anyway, so the next
// layer reads it from memory either way). Fixed rather than read from the CPU: in this VM sysconf
// reports a 512 MB L3. On the four layers timed (12.8–77 MB outputs), a 4 MB threshold changed
// nothing against 16 MB. RDN_KERNELS_CPU_STREAM_MIN_BYTES overrides it (the tests set 0).
int64_t stream_min_bytes() {
  const char* value = std::getenv("RDN_KERNELS_CPU_STREAM_MIN_BYTES");
  if (value && value[0]) return std::atoll(value);
  return int64_t{16} << 20;
}

// column[p] = values[p] + offset for p < count, the 16-byte-aligned middle with non-temporal
// stores (no read of the lines first; SSE, so any x86-64): float NCHW outputs too large to stay in
// cache. The caller fences once the tile is written.
inline void stream_column(float* column, const float* values, float offset, int64_t count) {
  int64_t p = 0;
#if defined(__x86_64__)
  for (; p < count && reinterpret_cast<std::uintptr_t>(column + p) % 16 != 0; ++p) column[p] = values[p] + offset;
  const __m128 add = _mm_set1_ps(offset);
  for (; p + 4 <= count; p += 4) _mm_stream_ps(column + p, _mm_add_ps(_mm_loadu_ps(values + p), add));
#endif
  for (; p < count; ++p) column[p] = values[p] + offset;
}

// dest[p][c] = buffer[c][p] (+ bias[c]) for a (pixels × channels) block; `stream`: NCHW float
// destinations take non-temporal stores (stream_column).
template <typename T>
void unpack_tile(const T* buffer, int64_t padded, const Matrix<T>& dest, const T* bias, bool stream = false) {
  if (dest.row_stride == 1) {
    for (int64_t c = 0; c < dest.cols; ++c) {
      T* column = dest.data + c * dest.col_stride;
      const T* values = buffer + c * padded;
      const T offset = bias ? bias[c] : T(0);
      if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          stream_column(column, values, offset, dest.rows);
          continue;
        }
      }
      for (int64_t p = 0; p < dest.rows; ++p) column[p] = values[p] + offset;
    }
  } else {
    kernels<T>().transpose(buffer, padded, dest.cols, dest.rows, dest.data, dest.row_stride, bias);
  }
}

// Destination blocks with their runs, owning the storage the kernel's raw pointers refer to.
struct DestinationPlan {
  std::vector<pm::DestinationBlock> blocks;
  std::vector<std::vector<pm::Run>> runs;

  void add(int64_t dest_row, int64_t weight_index, int64_t rows, std::vector<pm::Run> block_runs) {
    if (rows == 0) return;
    runs.push_back(std::move(block_runs));
    blocks.push_back({dest_row, weight_index, rows, nullptr, 0});
  }
  void finalize() {
    for (size_t b = 0; b < blocks.size(); ++b) {
      blocks[b].runs = runs[b].data();
      blocks[b].num_runs = static_cast<int64_t>(runs[b].size());
    }
  }
};

// dest[:, dest_col .. dest_col + dest_cols) = Σ weight · (source tile), as the plan says, tile by
// tile in parallel. `pack(row, rows, tile, ld, staging)` fills the `source_rows` pixel-major rows of
// the source tile for global destination pixels [row, row + rows); `staging_per_pixel` is how much
// scratch it wants per pixel.
template <typename T, typename Pack>
void tiled_product(int64_t source_rows, int64_t staging_per_pixel, Pack&& pack, PixelMatrix<T> dest,
                   int64_t dest_col, int64_t dest_cols, const T* weight, int64_t weight_dest_stride,
                   int64_t weight_source_stride, DestinationPlan& plan, const T* bias) {
  plan.finalize();
  const auto& kernel = kernels<T>();
  const int64_t total_rows = dest.samples * dest.rows;
  const Tiling tiling(total_rows, source_rows + staging_per_pixel + dest_cols, sizeof(T), kernel.pixel_multiple);
  // NCHW: each channel's pixels are contiguous runs, written whole (a stage's channels too).
  const bool stream = dest.row_stride == 1 && total_rows * dest_cols * static_cast<int64_t>(sizeof(T)) >= stream_min_bytes();
  at::parallel_for(0, tiling.slots, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> source_tile(source_rows * tiling.stride), dest_tile(dest_cols * tiling.stride);
    std::vector<T> staging(staging_per_pixel * tiling.stride);
    pm::Product<T> problem{source_tile.data(), tiling.stride, weight, weight_dest_stride,
                           weight_source_stride, dest_tile.data(), tiling.stride, tiling.rows,
                           plan.blocks.data(), static_cast<int64_t>(plan.blocks.size())};
    for (int64_t slot = begin; slot < end; ++slot) {
      const auto [first, last] = tiling.slot_range(slot);
      for (int64_t row = first; row < last; row += tiling.rows) {
        const int64_t rows = std::min(tiling.rows, last - row);
        // A tile whose pixels end inside a vector pair (the last one): no garbage in the lanes past them.
        if (rows % kernel.pixel_multiple != 0) std::fill(source_tile.begin(), source_tile.end(), T(0));
        pack(row, rows, source_tile.data(), tiling.stride, staging.data());
        // A short tile computes only the vectors its pixels need.
        problem.pixels = (rows + kernel.pixel_multiple - 1) / kernel.pixel_multiple * kernel.pixel_multiple;
        kernel.product(problem);
        for_each_piece(dest, row, rows, dest_cols, dest_col, [&](const Matrix<T>& piece, int64_t offset) {
          unpack_tile<T>(dest_tile.data() + offset, tiling.stride, piece, bias, stream);
        });
#if defined(__x86_64__)
        if (stream) _mm_sfence();  // this tile's streamed lines are visible before the thread moves on
#endif
      }
    }
  });
}

// tiled_product over a pixel matrix's first `source_cols` channels (1×1 convs, linear layers).
template <typename T>
void pointwise_product(PixelMatrix<const T> source, int64_t source_cols, PixelMatrix<T> dest, int64_t dest_col,
                       int64_t dest_cols, const T* weight, int64_t weight_dest_stride, int64_t weight_source_stride,
                       DestinationPlan& plan, const T* bias) {
  flatten_together(source, dest);
  auto pack = [&](int64_t row, int64_t rows, T* tile, int64_t ld, T*) {
    for_each_piece(source, row, rows, source_cols, 0, [&](const Matrix<const T>& piece, int64_t offset) {
      pack_tile(piece, tile + offset, ld);
    });
  };
  tiled_product<T>(source_cols, 0, pack, dest, dest_col, dest_cols, weight, weight_dest_stride, weight_source_stride,
                   plan, bias);
}

// Output groups lo..hi-1 as runs of input channels (weight source stride 1 along channels).
DestinationPlan forward_plan(const BlockLayout& layout, int64_t lo, int64_t hi, int64_t taps) {
  const int64_t first = layout.out_offsets[lo], read = layout.in_offsets[hi];
  DestinationPlan plan;
  for (int64_t j = lo; j < hi; ++j) {
    std::vector<pm::Run> runs;
    for (int64_t tap = 0; tap < taps; ++tap) {
      // Tile row tap·read + c holds input channel c at kernel tap `tap`; weight (D, C, kh, kw).
      for (const auto& [start, stop] : input_runs(layout, j)) {
        runs.push_back({tap * read + start, start * taps + tap, stop - start});
      }
    }
    plan.add(layout.out_offsets[j] - first, layout.out_offsets[j], layout.out_splits(j), std::move(runs));
  }
  return plan;
}

template <typename T>
void pointwise_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const BlockLayout& layout, int64_t lo, int64_t hi, at::Tensor& output, int64_t out_base) {
  const int64_t first = layout.out_offsets[lo];
  DestinationPlan plan = forward_plan(layout, lo, hi, 1);
  pointwise_product<T>(PixelMatrix<const T>::of(input), layout.in_offsets[hi], PixelMatrix<T>::of(output),
                       first - out_base, layout.out_offsets[hi] - first, weight.data_ptr<T>(), weight.size(1), 1, plan,
                       bias ? bias->data_ptr<T>() + first : nullptr);
}

// A channels-minor product, described by groups: output column c belongs to column group
// column_group[c]; the reduction runs over channel ranges, one per reduction group; column group a
// reads reduction group b when reads(a, b). The packed weight of (column c, reduction channel r) is
// weight[c · column_stride + r · reduction_stride] (the caller offsets `weight` to column 0).
//   forward:     columns = output channels of groups lo..hi-1, reduction = input channels,
//                weight (D, C) rows: column_stride = C, reduction_stride = 1;
//   grad_input:  columns = input channels, reduction = grad_output channels of groups lo..hi-1
//                (the transposed triangle), weight (D, C): column_stride = 1, reduction_stride = C.
struct ChannelsMinorProblem {
  std::vector<int64_t> column_group;
  std::vector<std::pair<int64_t, int64_t>> reduction_ranges;
  std::function<bool(int64_t, int64_t)> reads;
  int64_t column_stride, reduction_stride;
};

// Column blocks, owning the segments, chunks and bias the blocks point to (their packed weights
// live in pack_channels_minor's buffer of the calling thread).
struct ChannelsMinorPlan {
  std::vector<cm::ColumnBlock> blocks;
  std::vector<std::vector<cm::Segment>> segments;
  std::vector<std::vector<cm::Chunk>> chunks;
  std::vector<int64_t> packed_at;  // each block's first packed weight, and the total
  std::vector<float> bias;
};

// The blocks, segments and chunks of `problem` (pack_channels_minor fills the weights). `head`
// (0..15): the first column's lane in its vector, so that every later vector starts a 64-byte line
// of the output (cm::ColumnBlock); the first block then holds head + width ≤ 64 lanes.
ChannelsMinorPlan channels_minor_plan(const ChannelsMinorProblem& problem, int64_t head = 0) {
  const int64_t cols = static_cast<int64_t>(problem.column_group.size());
  constexpr int64_t width_max = cm::kLanes * cm::kMaxVectors;
  constexpr int64_t chunk_bytes = 32 * 1024;  // a chunk's packed weights in a core's L1 (32–48 KB)
  ChannelsMinorPlan plan;
  int64_t packed_size = 0;
  for (int64_t column = 0; column < cols; column += width_max - head, head = 0) {
    const int64_t width = std::min(width_max - head, cols - column);
    const int64_t vectors = (head + width + cm::kLanes - 1) / cm::kLanes;
    const int64_t chunk_channels = std::max<int64_t>(chunk_bytes / (vectors * cm::kLanes * 4), 16);
    // Segments: the reduction ranges some lane reads, with the lanes that read them, coalesced;
    // cut so that no chunk of consecutive segments reads more than chunk_channels channels.
    std::vector<cm::Segment> segments;
    for (int64_t g = 0; g < static_cast<int64_t>(problem.reduction_ranges.size()); ++g) {
      const auto [start, stop] = problem.reduction_ranges[g];
      if (start == stop) continue;
      cm::Segment segment{start, stop, {0, 0, 0, 0}, 0};
      bool any = false;
      for (int64_t l = 0; l < width; ++l) {
        if (problem.reads(problem.column_group[column + l], g)) {
          const int64_t lane = head + l;
          segment.lanes[lane / cm::kLanes] |= static_cast<uint16_t>(1u << (lane % cm::kLanes));
          any = true;
        }
      }
      if (!any) continue;
      while (segment.lanes[segment.first_vector] == 0) ++segment.first_vector;
      if (!segments.empty() && segments.back().stop == segment.start &&
          std::equal(segment.lanes, segment.lanes + cm::kMaxVectors, segments.back().lanes)) {
        segments.back().stop = segment.stop;  // the same lanes read the next range too: one segment
      } else {
        segments.push_back(segment);
      }
    }
    std::vector<cm::Segment> cut;
    std::vector<int64_t> chunk_starts = {0};  // index into `cut` of each chunk's first segment
    int64_t in_chunk = 0;
    for (const cm::Segment& segment : segments) {
      for (int64_t start = segment.start; start < segment.stop;) {
        if (in_chunk == chunk_channels) {
          chunk_starts.push_back(static_cast<int64_t>(cut.size()));
          in_chunk = 0;
        }
        const int64_t stop = std::min(segment.stop, start + chunk_channels - in_chunk);
        cut.push_back(segment);
        cut.back().start = start;
        cut.back().stop = stop;
        in_chunk += stop - start;
        start = stop;
      }
    }
    plan.packed_at.push_back(packed_size);
    for (const auto& segment : cut) packed_size += (segment.stop - segment.start) * vectors * cm::kLanes;
    // At least one chunk, possibly empty: a block no lane of which reads anything still writes its
    // columns (zero, or the bias).
    std::vector<cm::Chunk> chunks;
    for (size_t k = 0; k < chunk_starts.size(); ++k) {
      const int64_t end = k + 1 < chunk_starts.size() ? chunk_starts[k + 1] : static_cast<int64_t>(cut.size());
      chunks.push_back({nullptr, end - chunk_starts[k], nullptr});
    }
    plan.blocks.push_back({column, width, vectors, head, nullptr, static_cast<int64_t>(chunks.size()), nullptr});
    plan.segments.push_back(std::move(cut));
    plan.chunks.push_back(std::move(chunks));
  }
  plan.packed_at.push_back(packed_size);
  return plan;
}

// Packs the weights (as `problem` strides them from `weight`) and the bias (per column) into `plan`.
void pack_channels_minor(ChannelsMinorPlan& plan, const ChannelsMinorProblem& problem, const float* weight,
                         const float* bias) {
  const int64_t num_blocks = static_cast<int64_t>(plan.blocks.size());
  // The packed weights live in a buffer of the calling thread, kept between calls: a fresh vector
  // of a few hundred KB per call cost its page faults every time (a 960→320 @7 stage: 38 µs to
  // allocate and zero 300 KB, against 7 µs to zero a reused buffer, of a 373 µs call). It holds
  // the largest plan the thread has packed; the kernels finish with it before the call returns.
  static thread_local std::vector<float> storage;
  if (static_cast<int64_t>(storage.size()) < plan.packed_at.back()) storage.resize(plan.packed_at.back());
  std::fill_n(storage.data(), plan.packed_at.back(), 0.0f);
  float* const packed_base = storage.data();
  plan.bias.assign(bias ? num_blocks * cm::kLanes * cm::kMaxVectors : 0, 0.0f);
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const cm::ColumnBlock& block = plan.blocks[b];
      const int64_t step = block.vectors * cm::kLanes;
      for (int64_t l = 0; l < block.width; ++l) {  // one column at a time (a weight row: contiguous)
        const float* row = weight + (block.column + l) * problem.column_stride;
        const int64_t lane = block.head + l;
        float* packed = packed_base + plan.packed_at[b] + lane;
        for (const auto& segment : plan.segments[b]) {
          const bool reads = segment.lanes[lane / cm::kLanes] >> (lane % cm::kLanes) & 1u;
          for (int64_t c = segment.start; c < segment.stop; ++c, packed += step) {
            if (reads) *packed = row[c * problem.reduction_stride];
          }
        }
      }
      if (bias) {
        std::copy(bias + block.column, bias + block.column + block.width,
                  plan.bias.data() + b * cm::kLanes * cm::kMaxVectors + block.head);
      }
    }
  });
  for (int64_t b = 0; b < num_blocks; ++b) {
    const float* packed = packed_base + plan.packed_at[b];
    const cm::Segment* segment = plan.segments[b].data();
    for (cm::Chunk& chunk : plan.chunks[b]) {
      chunk.segments = segment;
      chunk.packed = packed;
      for (int64_t s = 0; s < chunk.num_segments; ++s, ++segment) {
        packed += (segment->stop - segment->start) * plan.blocks[b].vectors * cm::kLanes;
      }
    }
    plan.blocks[b].chunks = plan.chunks[b].data();
    plan.blocks[b].bias = bias ? plan.bias.data() + b * cm::kLanes * cm::kMaxVectors : nullptr;
  }
}

ChannelsMinorProblem forward_problem(const BlockLayout& layout, int64_t lo, int64_t hi) {
  ChannelsMinorProblem problem;
  for (int64_t j = lo; j < hi; ++j) problem.column_group.insert(problem.column_group.end(), layout.out_splits(j), j);
  for (int64_t i = 0; i < hi; ++i) problem.reduction_ranges.emplace_back(layout.in_offsets[i], layout.in_offsets[i + 1]);
  problem.reads = [&layout](int64_t j, int64_t i) { return layout.has_block(j, i); };
  problem.column_stride = layout.in_offsets.back();
  problem.reduction_stride = 1;
  return problem;
}

// grad_input of stages lo..hi: input channel c (group i) reads the grad_output channels of the
// groups j in [lo, hi) that read i; input groups ≥ hi read nothing (their gradient is zero).
ChannelsMinorProblem grad_input_problem(const BlockLayout& layout, int64_t lo, int64_t hi) {
  ChannelsMinorProblem problem;
  const int64_t groups = layout.num_groups(), base = layout.out_offsets[lo];
  for (int64_t i = 0; i < groups; ++i) problem.column_group.insert(problem.column_group.end(), layout.in_splits(i), i);
  for (int64_t j = lo; j < hi; ++j) {
    problem.reduction_ranges.emplace_back(layout.out_offsets[j] - base, layout.out_offsets[j + 1] - base);
  }
  problem.reads = [&layout, lo](int64_t i, int64_t g) { return layout.has_block(lo + g, i); };
  problem.column_stride = 1;
  problem.reduction_stride = layout.in_offsets.back();
  return problem;
}

// Which kernel family a channels_last 1×1 product runs on. The channels-minor kernels need no
// transposes but waste the lanes a segment's mask leaves idle in the vectors it runs (a vector
// runs over every channel some lane of it reads), and broadcast one input value per (pixel,
// channel, column block): a narrow block (6 or 8 columns, one vector) issues a broadcast load per
// FMA. The pixel-major kernels waste no lane but transpose every input and output value of a
// tile, in 8 × 8 blocks. Per pixel: channels-minor costs the lane MACs it runs plus
// kBroadcastMacs per broadcast, pixel-major the useful MACs plus kTransposeMacs per transposed
// value (channels rounded up to 8). Packing the weight costs about kPackMacs per packed weight,
// once per call. Fitted on MobileNetV2's 1×1 layers (K = 4, batch 16; every forward and every
// single stage, 1 and 2 threads, both paths forced, AVX-512 AMD EPYC, 2026-12-05): the rule's
// choice was 2.2 % slower than the faster path in geometric mean (the rule without the broadcast
// term and the rounding: 3.0 % on one thread, 5.8 % on two, where it sent narrow-output stages
// and the 7 × 7 layers to channels-minor at up to 1.37× the pixel-major time). Below
// kChannelsMinorMinRows pixels (a linear layer at batch 16) packing costs as much as the product.
constexpr int64_t kChannelsMinorMinRows = 256;
constexpr double kBroadcastMacs = 4;
constexpr double kTransposeMacs = 10;
constexpr double kPackMacs = 24;

bool prefers_channels_minor(const ChannelsMinorPlan& plan, const BlockLayout& layout, int64_t lo, int64_t hi,
                            int64_t read, int64_t cols, int64_t rows) {
  const char* value = std::getenv("RDN_KERNELS_CPU_CHANNELS_MINOR");
  if (value && value[0]) return value[0] == '1';
  double lane_macs = 0, broadcasts = 0, useful_macs = 0;
  for (size_t b = 0; b < plan.blocks.size(); ++b) {
    for (const cm::Segment& segment : plan.segments[b]) {
      const double channels = static_cast<double>(segment.stop - segment.start);
      lane_macs += channels * (plan.blocks[b].vectors - segment.first_vector) * cm::kLanes;
      broadcasts += channels;
    }
  }
  for (int64_t j = lo; j < hi; ++j) {
    for (const auto& [start, stop] : input_runs(layout, j)) useful_macs += double(layout.out_splits(j)) * (stop - start);
  }
  auto in_eights = [](int64_t channels) { return static_cast<double>((channels + 7) / 8 * 8); };
  const double transposed = in_eights(read) + in_eights(cols);
  const double packing = kPackMacs * static_cast<double>(plan.packed_at.back());
  return (lane_macs + kBroadcastMacs * broadcasts) * rows + packing <=
         (useful_macs + kTransposeMacs * transposed) * rows;
}

// RDN_KERNELS_CPU_CHANNELS_MINOR=0 turns the channels-minor path off, =1 takes it wherever it
// applies (to compare the two paths); unset, prefers_channels_minor chooses.
bool channels_minor_enabled() {
  static const bool available = cm::available();
  const char* value = std::getenv("RDN_KERNELS_CPU_CHANNELS_MINOR");
  return available && !(value && value[0] == '0');
}

// Runs `problem` on the channels-minor kernels: dest[p, dest_col + c] for the problem's columns
// from source[p, :] (both channels-minor pixel matrices), when they apply and the rule prefers
// them; returns false, doing nothing, otherwise.
bool channels_minor_product(const ChannelsMinorProblem& problem, const at::Tensor& source_tensor,
                            at::Tensor& dest_tensor, int64_t dest_col, const float* weight, const float* bias,
                            const BlockLayout& layout, int64_t lo, int64_t hi) {
  if (source_tensor.scalar_type() != at::kFloat || !channels_minor_enabled()) return false;
  auto source = PixelMatrix<const float>::of(source_tensor);
  auto dest = PixelMatrix<float>::of(dest_tensor);
  flatten_together(source, dest);
  if (source.samples != 1 || dest.samples != 1 || source.col_stride != 1 || dest.col_stride != 1) return false;
  const int64_t cols = static_cast<int64_t>(problem.column_group.size()), rows = source.rows;
  if (rows < kChannelsMinorMinRows || cols == 0) return false;  // packing would cost as much as the product
  // Vector stores on whole output lines: where every row starts at the same offset within a line
  // (a row stride of a multiple of 16 floats) and the shift adds no vector (no extra FMAs), the
  // first column goes to its lane within the line (cm::ColumnBlock::head). A stage into a wide
  // NHWC out= whose first channel is not a multiple of 16 otherwise splits every vector store
  // across two lines: 16→96 @112 stage 4/4 (channels 72–95 of 96), batch 16, 2 threads: 1.0–1.1
  // → 0.6–0.7 ms, where copying the stage's compact result into the same slice takes 0.58 ms.
  const auto first_address = reinterpret_cast<std::uintptr_t>(dest.data + dest_col);
  int64_t head = static_cast<int64_t>(first_address / sizeof(float) % cm::kLanes);
  const auto vectors_for = [](int64_t lanes) { return (lanes + cm::kLanes - 1) / cm::kLanes; };
  if (dest.row_stride % cm::kLanes != 0 || first_address % sizeof(float) != 0 ||
      vectors_for(head + cols) != vectors_for(cols)) {
    head = 0;
  }
  ChannelsMinorPlan plan = channels_minor_plan(problem, head);
  const int64_t read = problem.reduction_ranges.empty() ? 0 : problem.reduction_ranges.back().second;
  if (!prefers_channels_minor(plan, layout, lo, hi, read, cols, rows)) return false;
  pack_channels_minor(plan, problem, weight, bias);
  cm::Problem product{source.data, source.row_stride, dest.data + dest_col, dest.row_stride,
                      plan.blocks.data(), static_cast<int64_t>(plan.blocks.size())};
  // Non-temporal stores when the kernels write whole lines of an output (a fresh tensor, NHWC rows
  // of a multiple of 16 channels) too large to stay in cache: they skip reading every line before
  // writing it. 16→96 @112 (a 77 MB output) forward: 2.5 → 1.2 ms; 24→144 @56 (29 MB) 0.88 → 0.64 ms.
  const bool whole_lines = dest_col == 0 && dest.row_stride == cols && cols % cm::kLanes == 0 &&
                           reinterpret_cast<std::uintptr_t>(dest.data) % 64 == 0;
  product.stream = whole_lines && rows * cols * static_cast<int64_t>(sizeof(float)) >= stream_min_bytes();
  // One balanced row range per thread (balanced_range), cut into tiles: a multiple of every
  // block's register rows (6, 8, 12, 16), input and output of a tile within a core's L2.
  constexpr int64_t multiple = 48, tile_bytes = 256 * 1024;
  const int64_t slots = thread_slots(rows, multiple);
  const int64_t tile = std::max(multiple, tile_bytes / ((read + cols) * 4) / multiple * multiple);
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      const auto [first, last] = balanced_range(rows, slots, slot, multiple);
      for (int64_t row = first; row < last; row += tile) cm::product(product, row, std::min(last, row + tile));
    }
  });
  return true;
}

// The forward of a 1×1 convolution (or linear layer) on the channels-minor kernels, when they apply.
bool channels_minor_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const BlockLayout& layout, int64_t lo, int64_t hi, at::Tensor& output, int64_t out_base) {
  const int64_t first = layout.out_offsets[lo];
  if (input.scalar_type() != at::kFloat || layout.out_offsets[hi] == first) return false;
  return channels_minor_product(forward_problem(layout, lo, hi), input, output, first - out_base,
                                weight.data_ptr<float>() + first * weight.size(1),
                                bias ? bias->data_ptr<float>() + first : nullptr, layout, lo, hi);
}

// grad_input of a 1×1 convolution (or linear layer) on the channels-minor kernels, when they apply.
bool channels_minor_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                               int64_t lo, int64_t hi, at::Tensor& grad_input) {
  if (grad_output.scalar_type() != at::kFloat) return false;
  return channels_minor_product(grad_input_problem(layout, lo, hi), grad_output, grad_input, 0,
                                weight.data_ptr<float>() + layout.out_offsets[lo] * weight.size(1), nullptr, layout, lo,
                                hi);
}

// grad_weight of a 1×1 convolution (or linear layer) on the channels-minor kernels, when
// grad_output and input are both channels-minor pixel matrices: per thread, pixels in L2-sized
// tiles, every (6 output channels, 64 input channels) tile of the blocks in the mask accumulated
// in registers over a pixel tile. Blocks outside the mask are never touched and stay exactly zero.
c10::optional<at::Tensor> channels_minor_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                                     const at::Tensor& weight, const BlockLayout& layout, int64_t lo,
                                                     int64_t hi) {
  if (input.scalar_type() != at::kFloat || !channels_minor_enabled()) return c10::nullopt;
  const char* value = std::getenv("RDN_KERNELS_CPU_CHANNELS_MINOR");
  auto gradient = PixelMatrix<const float>::of(grad_output);
  auto activation = PixelMatrix<const float>::of(input);
  flatten_together(gradient, activation);
  if (gradient.samples != 1 || activation.samples != 1 || gradient.col_stride != 1 || activation.col_stride != 1) {
    return c10::nullopt;
  }
  const int64_t rows = gradient.rows, base = layout.out_offsets[lo], channels = weight.size(1);
  if (rows < kChannelsMinorMinRows && !(value && value[0] == '1')) return c10::nullopt;
  std::vector<cm::WeightGradientTile> tiles;
  for (int64_t j = lo; j < hi; ++j) {
    for (int64_t o = layout.out_offsets[j]; o < layout.out_offsets[j + 1]; o += cm::kGradientRows) {
      const int64_t count = std::min(cm::kGradientRows, layout.out_offsets[j + 1] - o);
      for (const auto& [start, stop] : input_runs(layout, j)) {
        for (int64_t c = start; c < stop; c += cm::kLanes * cm::kMaxVectors) {
          tiles.push_back({o - base, o, count, c, std::min(cm::kLanes * cm::kMaxVectors, stop - c)});
        }
      }
    }
  }
  const int64_t read = layout.in_offsets[hi], outputs = grad_output.size(1);
  // Pixel tiles whose gradient and input rows stay in L2 while every weight tile goes over them.
  const int64_t tile_pixels = std::max<int64_t>(64, std::min<int64_t>(1024, (256 * 1024) / ((read + outputs) * 4)));
  // One balanced pixel range per thread (balanced_range), in tiles of tile_pixels.
  const int64_t slots = thread_slots(rows, 64);
  at::Tensor partial = at::zeros({slots, weight.size(0), channels}, weight.options());
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      const cm::WeightGradientProblem problem{gradient.data, gradient.row_stride, activation.data,
                                              activation.row_stride, partial.data_ptr<float>() + slot * weight.size(0) * channels,
                                              channels, tiles.data(), static_cast<int64_t>(tiles.size())};
      const auto [first, last] = balanced_range(rows, slots, slot, 1);
      for (int64_t pixel = first; pixel < last; pixel += tile_pixels) {
        cm::weight_gradient(problem, pixel, std::min(last, pixel + tile_pixels));
      }
    }
  });
  return (slots == 1 ? partial[0] : partial.sum(0)).view(weight.sizes());
}

// Implicit GEMM of a k×k (strided, padded, dilated) convolution: each tile of output pixels is
// unfolded (im2col) into pixel-major rows (tap, input channel) and goes through the same product.
template <typename T>
struct Unfold {
  const T* data;
  int64_t channels, height, width, stride_n, stride_c, stride_h, stride_w;
  int64_t out_height, out_width, kernel_h, kernel_w;
  const Geometry& geometry;
  bool channels_contiguous;  // NHWC: unfold through a staging buffer and one transpose

  // [first, last) of output columns ow whose input column ow·s − p + kw·d lies inside the image.
  std::pair<int64_t, int64_t> valid_columns(int64_t kw, int64_t ow_begin, int64_t ow_end) const {
    const int64_t s = geometry.stride[1], offset = kw * geometry.dilation[1] - geometry.padding[1];
    auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); };
    const int64_t first = std::min(ow_end, std::max(ow_begin, ceil_div(-offset, s)));
    const int64_t last = std::min(ow_end, ceil_div(width - offset, s));
    return {first, std::max(first, last)};
  }

  // Calls visit(n, oh, ow_begin, ow_end, column) for each output-row segment of pixels [row, row + rows).
  template <typename Visit>
  void for_each_segment(int64_t row, int64_t rows, Visit&& visit) const {
    int64_t column = 0;
    while (column < rows) {
      const int64_t pixel = row + column, per_sample = out_height * out_width;
      const int64_t n = pixel / per_sample, oh = (pixel % per_sample) / out_width, ow = pixel % out_width;
      const int64_t count = std::min(rows - column, out_width - ow);
      visit(n, oh, ow, ow + count, column);
      column += count;
    }
  }

  void pack(int64_t row, int64_t rows, T* tile, int64_t ld, T* staging) const {
    const int64_t taps = kernel_h * kernel_w;
    for_each_segment(row, rows, [&](int64_t n, int64_t oh, int64_t ow_begin, int64_t ow_end, int64_t column) {
      for (int64_t kh = 0; kh < kernel_h; ++kh) {
        const int64_t ih = oh * geometry.stride[0] - geometry.padding[0] + kh * geometry.dilation[0];
        for (int64_t kw = 0; kw < kernel_w; ++kw) {
          const int64_t tap = kh * kernel_w + kw;
          const auto [first, last] = ih >= 0 && ih < height ? valid_columns(kw, ow_begin, ow_end)
                                                              : std::pair<int64_t, int64_t>{ow_begin, ow_begin};
          const int64_t iw0 = kw * geometry.dilation[1] - geometry.padding[1];
          if (channels_contiguous) {  // NHWC: rows of `channels` values into staging (pixels × taps·channels)
            for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
              T* out = staging + (column + ow - ow_begin) * taps * channels + tap * channels;
              if (ow < first || ow >= last) {
                std::fill(out, out + channels, T(0));
              } else {
                const T* in = data + n * stride_n + ih * stride_h + (ow * geometry.stride[1] + iw0) * stride_w;
                std::memcpy(out, in, channels * sizeof(T));
              }
            }
          } else {  // NCHW: straight into the pixel-major tile
            for (int64_t c = 0; c < channels; ++c) {
              T* out = tile + (tap * channels + c) * ld + column - ow_begin;
              const T* in = data + n * stride_n + c * stride_c + ih * stride_h;
              for (int64_t ow = ow_begin; ow < first; ++ow) out[ow] = T(0);
              if (geometry.stride[1] == 1 && stride_w == 1) {
                std::memcpy(out + first, in + first + iw0, (last - first) * sizeof(T));
              } else {
                for (int64_t ow = first; ow < last; ++ow) out[ow] = in[(ow * geometry.stride[1] + iw0) * stride_w];
              }
              for (int64_t ow = last; ow < ow_end; ++ow) out[ow] = T(0);
            }
          }
        }
      }
    });
    if (channels_contiguous) kernels<T>().transpose(staging, taps * channels, rows, taps * channels, tile, ld, nullptr);
  }
};

template <typename T>
void unfolded_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi, at::Tensor& output,
                      int64_t out_base) {
  const int64_t first = layout.out_offsets[lo], read = layout.in_offsets[hi];
  const int64_t taps = weight.size(2) * weight.size(3);
  const bool channels_last = input.stride(1) == 1;
  const Unfold<T> unfold{input.data_ptr<T>(), read, input.size(2), input.size(3), input.stride(0), input.stride(1),
                         input.stride(2), input.stride(3), output.size(2), output.size(3), weight.size(2),
                         weight.size(3), geometry, channels_last};
  DestinationPlan plan = forward_plan(layout, lo, hi, taps);
  auto pack = [&](int64_t row, int64_t rows, T* tile, int64_t ld, T* staging) {
    unfold.pack(row, rows, tile, ld, staging);
  };
  auto dest = PixelMatrix<T>::of(output);
  if (dest.flattenable()) dest = dest.flattened();
  tiled_product<T>(taps * read, channels_last ? taps * read : 0, pack, dest, first - out_base,
                   layout.out_offsets[hi] - first, weight.data_ptr<T>(), weight.size(1) * taps, taps, plan,
                   bias ? bias->data_ptr<T>() + first : nullptr);
}

template <typename T>
void pointwise_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                          int64_t lo, int64_t hi, at::Tensor& grad_input) {
  const int64_t base = layout.out_offsets[lo], channels = weight.size(1);
  DestinationPlan plan;
  for (int64_t i = 0; i < hi; ++i) {
    std::vector<pm::Run> runs;
    for (const auto& [start, stop] : output_runs(layout, i, lo, hi)) {
      runs.push_back({start - base, start * channels, stop - start});
    }
    plan.add(layout.in_offsets[i], layout.in_offsets[i], layout.in_splits(i), std::move(runs));
  }
  // Input channels of groups ≥ hi are not read by these stages: their gradient is zero.
  const int64_t prefix = layout.in_offsets[hi];
  plan.add(prefix, prefix, grad_input.size(1) - prefix, {});
  pointwise_product<T>(PixelMatrix<const T>::of(grad_output), grad_output.size(1), PixelMatrix<T>::of(grad_input), 0,
                       grad_input.size(1), weight.data_ptr<T>(), 1, channels, plan, nullptr);
}

// buffer[p][c] = source[p][c] for a (pixels × channels) block: channels contiguous, rows `ld` apart.
template <typename T>
void pack_rows(const Matrix<const T>& source, T* buffer, int64_t ld) {
  if (source.col_stride == 1) {  // NHWC: each pixel's channels are contiguous
    for (int64_t p = 0; p < source.rows; ++p) {
      std::memcpy(buffer + p * ld, source.data + p * source.row_stride, source.cols * sizeof(T));
    }
  } else {  // NCHW: a transpose
    kernels<T>().transpose(source.data, source.col_stride, source.cols, source.rows, buffer, ld, nullptr);
  }
}

// grad_weight[o, c] = Σ_p grad_output[p, o] · input[p, c] over the blocks in the mask, as the same
// register-blocked product with the roles turned: vectors run along input channels c, the
// reduction along pixels. Per pixel tile: grad_output packed pixel-major (o rows), input packed
// channel-contiguous (p rows); each (group, run) block goes to a scratch tile and is added into
// this thread's accumulator. Blocks outside the mask are never touched and stay exactly zero.
template <typename T>
at::Tensor pointwise_grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const BlockLayout& layout, int64_t lo, int64_t hi) {
  const int64_t base = layout.out_offsets[lo], read = layout.in_offsets[hi], channels = weight.size(1);
  auto gradient = PixelMatrix<const T>::of(grad_output);
  auto activation = PixelMatrix<const T>::of(input);
  flatten_together(gradient, activation);
  const auto& kernel = kernels<T>();
  const int64_t multiple = kernel.pixel_multiple;
  const int64_t gradient_cols = grad_output.size(1), total_rows = gradient.samples * gradient.rows;
  // Room past the last channel: the kernel computes whole vectors, the excess is discarded.
  const int64_t activation_ld = read + multiple;
  const Tiling tiling(total_rows, gradient_cols + activation_ld, sizeof(T), multiple);
  struct Block {
    int64_t gradient_row, out_row, rows, col, cols;
  };
  std::vector<Block> blocks;
  for (int64_t j = lo; j < hi; ++j) {
    for (const auto& [start, stop] : input_runs(layout, j)) {
      blocks.push_back({layout.out_offsets[j] - base, layout.out_offsets[j], layout.out_splits(j), start, stop - start});
    }
  }
  const int64_t slots = tiling.slots;
  at::Tensor partial = at::zeros({slots, weight.size(0), channels}, weight.options());
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> gradient_tile(gradient_cols * tiling.stride), activation_tile(activation_ld * tiling.rows);
    std::vector<T> scratch(weight.size(0) * activation_ld);
    for (int64_t slot = begin; slot < end; ++slot) {
      T* accumulator = partial.data_ptr<T>() + slot * weight.size(0) * channels;
      const auto [first, last] = tiling.slot_range(slot);
      for (int64_t row = first; row < last; row += tiling.rows) {
        const int64_t rows = std::min(tiling.rows, last - row);
        for_each_piece(gradient, row, rows, gradient_cols, 0, [&](const Matrix<const T>& piece, int64_t offset) {
          pack_tile(piece, gradient_tile.data() + offset, tiling.stride);
        });
        for_each_piece(activation, row, rows, read, 0, [&](const Matrix<const T>& piece, int64_t offset) {
          pack_rows(piece, activation_tile.data() + offset * activation_ld, activation_ld);
        });
        for (const Block& block : blocks) {
          const pm::Run run{0, 0, rows};
          const pm::DestinationBlock dest{0, 0, block.rows, &run, 1};
          const pm::Product<T> problem{activation_tile.data() + block.col, activation_ld,
                                       gradient_tile.data() + block.gradient_row * tiling.stride,
                                       tiling.stride, 1, scratch.data(), activation_ld,
                                       (block.cols + multiple - 1) / multiple * multiple, &dest, 1};
          kernel.product(problem);
          for (int64_t r = 0; r < block.rows; ++r) {
            T* out = accumulator + (block.out_row + r) * channels + block.col;
            const T* values = scratch.data() + r * activation_ld;
            for (int64_t c = 0; c < block.cols; ++c) out[c] += values[c];
          }
        }
      }
    }
  });
  return (slots == 1 ? partial[0] : partial.sum(0)).view(weight.sizes());
}

bool is_pixel_matrix(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

bool use_pointwise(const at::Tensor& input, const at::Tensor& weight, const Geometry& geometry) {
  return weight.size(2) == 1 && weight.size(3) == 1 && geometry.stride == std::vector<int64_t>{1, 1} &&
         geometry.padding == std::vector<int64_t>{0, 0} && is_pixel_matrix(input) &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

// Whether a k×k product runs one dense convolution per output group (each over the input channels
// it reads: the useful FLOPs, K calls and a copy of each result) rather than one on the masked
// rows of all the groups (the bounding rectangle's FLOPs: (K + 1) / 2K of them useful for a full
// triangle). Measured on 3×3 layers, K = 4, batch 16, 2 threads, both layouts: per group was 1.14–
// 1.50× faster forward and backward with groups of 32 and 64 channels (128→128 @28, 256→256 @14),
// even with 24 (96→96 @28), and up to 1.2× slower with 16 (64→64 @56), where oneDNN's convolutions
// of few channels run far below its peak (benchmarks/results/kxk_cpu.md).
bool kxk_dense_per_group(const BlockLayout& layout, int64_t lo, int64_t hi) {
  constexpr int64_t kMinGroupChannels = 32;
  if (hi - lo < 2) return false;
  for (int64_t j = lo; j < hi; ++j) {
    if (layout.out_splits(j) > 0 && layout.out_splits(j) < kMinGroupChannels) return false;
  }
  return true;
}

}  // namespace

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                   const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(input.device().is_cpu(), "rdn cpp backend: expected CPU tensors");
  // The kernels read and write NCHW- or NHWC-contiguous tensors and a contiguous bias (no copy
  // then); any other input or bias is copied once, and any other `out` gets the result copied into
  // its channels. Decided here rather than in Python: a stage call pays the op's entry every time.
  if (!is_pixel_matrix(input) || (bias && !bias->is_contiguous())) {
    return forward(input.contiguous(), weight, bias ? c10::optional<at::Tensor>(bias->contiguous()) : bias, layout,
                   geometry, lo, hi, out);
  }
  if (out && !is_pixel_matrix(*out)) {
    const at::Tensor result = forward(input, weight, bias, layout, geometry, lo, hi, c10::nullopt);
    out->narrow(1, layout.out_offsets[lo], result.size(1)).copy_(result);
    return *out;
  }
  const at::Tensor weight_c = weight.contiguous();
  const int64_t channels = layout.out_offsets[hi] - layout.out_offsets[lo];
  // k×k: dense convolutions on the masked weight rows (kxk_dense_per_group says whether one for all
  // the groups or one per group). Into a fresh output one convolution ran 2.4× faster than this
  // file's unfolded product on 3×3 16→16 @112 in channels_last, on par in NCHW. Into out= (a
  // stage), the convolution and a copy into out's channels: 1.2–4× faster than the unfolded
  // product writing in place in channels_last, and in NCHW from 16 channels a stage up (1.1–2×);
  // in NCHW a stage of 4–8 channels (3×3 16→16 @112, 32→32 @56) ran 1.2–2.3× faster unfolded,
  // where oneDNN's few-channel NCHW convolution is slow (benchmarks/results/kxk_cpu.md).
  constexpr int64_t kUnfoldedStageChannels = 12;  // NCHW stages up to this many channels stay unfolded
  const bool unfolded_stage = out && memory_format_of(input) != at::MemoryFormat::ChannelsLast &&
                              channels <= kUnfoldedStageChannels;
  if (!use_pointwise(input, weight, geometry) && !unfolded_stage) {
    const bool per_group = kxk_dense_per_group(layout, lo, hi);
    if (!out && !per_group) {
      if (auto output = masked_dense_forward(input, weight_c, bias, layout, geometry, lo, hi)) return *output;
    } else {
      at::Tensor output = out ? *out : rdn::empty(output_shape(input, weight, geometry, channels),
                                                  input.options().memory_format(memory_format_of(input)));
      masked_dense_forward_into(input, weight_c, bias, layout, geometry, lo, hi, output,
                                out ? 0 : layout.out_offsets[lo], per_group);
      return output;
    }
  }
  at::Tensor output = out ? *out : rdn::empty(output_shape(input, weight, geometry, channels),
                                             input.options().memory_format(memory_format_of(input)));
  const int64_t out_base = out ? 0 : layout.out_offsets[lo];
  if (use_pointwise(input, weight, geometry) && is_pixel_matrix(output)) {
    if (!channels_minor_forward(input, weight_c, bias, layout, lo, hi, output, out_base)) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rdn_pointwise_forward", [&] {
        pointwise_forward<scalar_t>(input, weight_c, bias, layout, lo, hi, output, out_base);
      });
    }
  } else {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rdn_unfolded_forward", [&] {
      unfolded_forward<scalar_t>(input, weight_c, bias, layout, geometry, lo, hi, output, out_base);
    });
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, bool has_bias,
                                                        const BlockLayout& layout, const Geometry& geometry, int64_t lo,
                                                        int64_t hi, bool needs_input, bool needs_weight) {
  TORCH_CHECK(input.device().is_cpu(), "rdn cpp backend: expected CPU tensors");
  if (!is_pixel_matrix(grad_output) || !is_pixel_matrix(input)) {  // as forward: other layouts copied once
    return backward(grad_output.contiguous(), input.contiguous(), weight, has_bias, layout, geometry, lo, hi,
                    needs_input, needs_weight);
  }
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor grad_input, grad_weight;
  const at::Tensor grad_bias = has_bias ? bias_gradient(grad_output, weight, layout, lo, hi) : at::Tensor();
  if (use_pointwise(input, weight, geometry) && is_pixel_matrix(grad_output)) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rdn_pointwise_backward", [&] {
      if (needs_input) {
        grad_input = rdn::empty_like(input);
        if (!channels_minor_grad_input(grad_output, weight_c, layout, lo, hi, grad_input)) {
          pointwise_grad_input<scalar_t>(grad_output, weight_c, layout, lo, hi, grad_input);
        }
      }
      if (needs_weight) {
        const auto fast = channels_minor_grad_weight(grad_output, input, weight_c, layout, lo, hi);
        grad_weight = fast ? *fast : pointwise_grad_weight<scalar_t>(grad_output, input, weight_c, layout, lo, hi);
      }
    });
  } else {
    // k×k: one dense backward on the masked weight. With the forward above, forward + backward ran
    // 1.0–3.0× faster than the per-block calls and this file's unfolded grad_input on every 3×3
    // shape measured (benchmarks/results/kxk_cpu.md): one library call beats K(K+1)/2 on small blocks.
    std::tie(grad_input, grad_weight) = masked_dense_backward(grad_output, input, weight_c, layout, geometry, lo, hi,
                                                              needs_input, needs_weight,
                                                              kxk_dense_per_group(layout, lo, hi));
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rdn
