// AVX-512 kernels of channels_minor.h: R pixels × V vectors of output columns in registers.
// (Not named *_avx*: setup.py drops those on other architectures, and this file also holds the
// stubs that say "not available" there.)
#include <algorithm>
#include <cstdint>

#include "channels_minor.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma")
#include <immintrin.h>

namespace rdn::cpu::channels_minor {
namespace {

// Rows per register block for V vectors: R·V accumulators + V weights + 1 broadcast ≤ 32 zmm,
// and enough rows that the V weight loads of a channel are amortised over R·V FMAs.
template <int V>
constexpr int rows_for() {
  return V == 4 ? 6 : V == 3 ? 8 : V == 2 ? 12 : 16;
}

// acc[r][v] += packed · x over one segment, for the vectors v ≥ V0 (the others have no lane in it).
template <int V, int R, int V0>
__attribute__((always_inline)) inline void segment_rows(__m512 (&acc)[R][V], const Segment& segment, const float* x,
                                                        int64_t ldx, const float* w) {
  __mmask16 lanes[V];
#pragma GCC unroll 4
  for (int v = V0; v < V; ++v) lanes[v] = segment.lanes[v];
  for (int64_t c = segment.start; c < segment.stop; ++c, w += V * kLanes) {
    __m512 weight[V];
#pragma GCC unroll 4
    for (int v = V0; v < V; ++v) weight[v] = _mm512_loadu_ps(w + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 value = _mm512_set1_ps(x[r * ldx + c]);
#pragma GCC unroll 4
      for (int v = V0; v < V; ++v) acc[r][v] = _mm512_mask3_fmadd_ps(weight[v], value, acc[r][v], lanes[v]);
    }
  }
}

// The lanes vector v of V stores: the first vector only those of ``head_mask`` (when Head: a block
// with head lanes, ColumnBlock), the last only those of ``tail_mask``. Head is a template argument
// so that blocks without head lanes, nearly all of them, compile to the code they had before.
template <int V, bool Head>
inline __mmask16 vector_mask(int v, __mmask16 head_mask, __mmask16 tail_mask) {
  const __mmask16 head = Head && v == 0 ? head_mask : static_cast<__mmask16>(0xFFFF);
  return v == V - 1 ? static_cast<__mmask16>(head & tail_mask) : head;
}

// R rows of V vectors from registers to memory (row stride ``ld`` floats), each vector's lanes as
// vector_mask says. ``stream``: full vectors go out with non-temporal stores (Problem::stream says
// when that is valid).
template <int R, int V, bool Head = false>
inline void store_tile(float* out, int64_t ld, __mmask16 head_mask, __mmask16 tail_mask, const __m512 (&acc)[R][V],
                       bool stream = false) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __mmask16 mask = vector_mask<V, Head>(v, head_mask, tail_mask);
      if (mask != 0xFFFF) {
        _mm512_mask_storeu_ps(out + r * ld + v * kLanes, mask, acc[r][v]);
      } else if (stream) {
        _mm512_stream_ps(out + r * ld + v * kLanes, acc[r][v]);
      } else {
        _mm512_storeu_ps(out + r * ld + v * kLanes, acc[r][v]);
      }
    }
  }
}

template <int V, int R, bool Head>
inline void block_rows(const Problem& problem, const ColumnBlock& block, const Chunk& chunk, bool accumulate,
                       bool stream, int64_t row) {
  const int64_t tail = block.head + block.width - (V - 1) * kLanes;  // lanes used in the last vector (1..16)
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1u);
  const __mmask16 head_mask = static_cast<__mmask16>(0xFFFFu << block.head);
  // Lane 0 of the block; with a head this address lies before the first column (the head lanes
  // are masked off every load and store, so it is never dereferenced).
  float* y = problem.y + row * problem.ldy + (block.column - block.head);
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (accumulate) {
        const __mmask16 mask = vector_mask<V, Head>(v, head_mask, tail_mask);
        acc[r][v] = mask != 0xFFFF ? _mm512_maskz_loadu_ps(mask, y + r * problem.ldy + v * kLanes)
                                   : _mm512_loadu_ps(y + r * problem.ldy + v * kLanes);
      } else {
        acc[r][v] = block.bias ? _mm512_loadu_ps(block.bias + v * kLanes) : _mm512_setzero_ps();
      }
    }
  }
  const float* x = problem.x + row * problem.ldx;
  const float* w = chunk.packed;
  for (int64_t s = 0; s < chunk.num_segments; ++s) {
    const Segment& segment = chunk.segments[s];
    switch (segment.first_vector) {  // V0: a compile-time start, so the accumulators stay in registers
      case 0: segment_rows<V, R, 0>(acc, segment, x, problem.ldx, w); break;
      case 1: if constexpr (V > 1) segment_rows<V, R, 1>(acc, segment, x, problem.ldx, w); break;
      case 2: if constexpr (V > 2) segment_rows<V, R, 2>(acc, segment, x, problem.ldx, w); break;
      default: if constexpr (V > 3) segment_rows<V, R, 3>(acc, segment, x, problem.ldx, w); break;
    }
    w += (segment.stop - segment.start) * V * kLanes;
  }
  store_tile<R, V, Head>(y, problem.ldy, head_mask, tail_mask, acc, stream);
}

// Asks for the input rows [row, row + count) (up to `end`) in L1: the first pass over a tile
// streams it from memory, and on the memory-bound layers (few channels, many pixels) the
// hardware prefetcher alone leaves the FMAs waiting.
inline void prefetch_rows(const Problem& problem, int64_t row, int64_t count, int64_t end) {
  const int64_t bytes = problem.ldx * static_cast<int64_t>(sizeof(float));
  for (int64_t r = row; r < std::min(row + count, end); ++r) {
    const char* line = reinterpret_cast<const char*>(problem.x + r * problem.ldx);
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(line + offset, _MM_HINT_T0);
  }
}

template <int V, bool Head>
void block_range(const Problem& problem, const ColumnBlock& block, int64_t begin, int64_t end, bool first_pass) {
  constexpr int R = rows_for<V>();
  constexpr int64_t ahead = 4 * R;  // rows
  const bool prefetch = first_pass && problem.ldx <= 256;  // wider rows stay in L2 between blocks
  const bool stream = problem.stream;
  for (int64_t k = 0; k < block.num_chunks; ++k) {
    const Chunk& chunk = block.chunks[k];
    int64_t row = begin;
    for (; row + R <= end; row += R) {
      if (prefetch && k == 0) prefetch_rows(problem, row + ahead, R, end);
      block_rows<V, R, Head>(problem, block, chunk, k > 0, stream && k + 1 == block.num_chunks, row);
    }
    for (; row < end; ++row) {
      block_rows<V, 1, Head>(problem, block, chunk, k > 0, stream && k + 1 == block.num_chunks, row);
    }
  }
}

// block_range for a block of V vectors, compiled with and without head lanes.
template <int V>
void vector_block_range(const Problem& problem, const ColumnBlock& block, int64_t begin, int64_t end,
                        bool first_pass) {
  if (block.head != 0) {
    block_range<V, true>(problem, block, begin, end, first_pass);
  } else {
    block_range<V, false>(problem, block, begin, end, first_pass);
  }
}

template <int R, int V>
void gradient_tile(const WeightGradientProblem& problem, const WeightGradientTile& tile, int64_t begin,
                   int64_t end) {
  const int64_t tail = tile.cols - (V - 1) * kLanes;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1u);
  float* out = problem.acc + tile.row * problem.ld_acc + tile.col;
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      acc[r][v] = v == V - 1 ? _mm512_maskz_loadu_ps(tail_mask, out + r * problem.ld_acc + v * kLanes)
                             : _mm512_loadu_ps(out + r * problem.ld_acc + v * kLanes);
    }
  }
  const float* g = problem.g + begin * problem.ldg + tile.g_col;
  const float* x = problem.x + begin * problem.ldx + tile.col;
  for (int64_t p = begin; p < end; ++p, g += problem.ldg, x += problem.ldx) {
    __m512 value[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      value[v] = v == V - 1 ? _mm512_maskz_loadu_ps(tail_mask, x + v * kLanes) : _mm512_loadu_ps(x + v * kLanes);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 gradient = _mm512_set1_ps(g[r]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(gradient, value[v], acc[r][v]);
    }
  }
  store_tile<R, V>(out, problem.ld_acc, 0xFFFF, tail_mask, acc);
}

template <int R>
void gradient_rows(const WeightGradientProblem& problem, const WeightGradientTile& tile, int64_t begin,
                   int64_t end) {
  switch ((tile.cols + kLanes - 1) / kLanes) {
    case 4: gradient_tile<R, 4>(problem, tile, begin, end); break;
    case 3: gradient_tile<R, 3>(problem, tile, begin, end); break;
    case 2: gradient_tile<R, 2>(problem, tile, begin, end); break;
    default: gradient_tile<R, 1>(problem, tile, begin, end); break;
  }
}

}  // namespace

void weight_gradient(const WeightGradientProblem& problem, int64_t pixel_begin, int64_t pixel_end) {
  for (int64_t t = 0; t < problem.num_tiles; ++t) {
    const WeightGradientTile& tile = problem.tiles[t];
    switch (tile.rows) {
      case 6: gradient_rows<6>(problem, tile, pixel_begin, pixel_end); break;
      case 5: gradient_rows<5>(problem, tile, pixel_begin, pixel_end); break;
      case 4: gradient_rows<4>(problem, tile, pixel_begin, pixel_end); break;
      case 3: gradient_rows<3>(problem, tile, pixel_begin, pixel_end); break;
      case 2: gradient_rows<2>(problem, tile, pixel_begin, pixel_end); break;
      default: gradient_rows<1>(problem, tile, pixel_begin, pixel_end); break;
    }
  }
}

bool available() {
  __builtin_cpu_init();
  // Every extension this file is compiled for (the target pragma above), not only the foundation:
  // some AVX-512 CPUs (Xeon Phi) lack VL / BW / DQ.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}

void product(const Problem& problem, int64_t row_begin, int64_t row_end) {
  for (int64_t b = 0; b < problem.num_blocks; ++b) {
    const ColumnBlock& block = problem.blocks[b];
    const bool first_pass = b == 0;
    switch (block.vectors) {
      case 4: vector_block_range<4>(problem, block, row_begin, row_end, first_pass); break;
      case 3: vector_block_range<3>(problem, block, row_begin, row_end, first_pass); break;
      case 2: vector_block_range<2>(problem, block, row_begin, row_end, first_pass); break;
      default: vector_block_range<1>(problem, block, row_begin, row_end, first_pass); break;
    }
  }
  if (problem.stream) _mm_sfence();  // the streamed lines are visible before the caller moves on
}

}  // namespace rdn::cpu::channels_minor

#else  // not x86-64: no kernels, the pixel-major path runs

namespace rdn::cpu::channels_minor {
bool available() { return false; }
void product(const Problem&, int64_t, int64_t) {}
void weight_gradient(const WeightGradientProblem&, int64_t, int64_t) {}
}  // namespace rdn::cpu::channels_minor

#endif
