// Register-blocked micro-kernels of the nested 1×1 convolution on pixel-major tiles.
//
// Plain C++ (no torch headers) with GCC vector extensions. Vectors run along PIXELS, so a
// narrow channel group (3 or 6 output channels, as in MobileNet projections split K ways) wastes
// no SIMD lane, and the reduction loop of a destination block visits only the source channels of
// its runs: the empty tiles of the block triangle cost nothing.
//
// This header is included by one translation unit per instruction set (pixel_major_avx512.cpp,
// pixel_major_avx2.cpp, pixel_major_generic.cpp), each compiling it under its own
// `#pragma GCC target` with RDN_VECTOR_BYTES / RDN_ROW_BLOCK set for that ISA's register file.

#include <cstdint>
#include <cstring>

#include "pixel_major.h"

#ifdef RDN_USE_AVX
#include <immintrin.h>
#endif

#ifndef RDN_VECTOR_BYTES
#error "define RDN_VECTOR_BYTES before including pixel_major_kernels.h"
#endif

namespace rdn::cpu::pixel_major::RDN_ISA_NAMESPACE {
namespace {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(RDN_VECTOR_BYTES)));
  static constexpr int64_t lanes = RDN_VECTOR_BYTES / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // From memory, so the broadcast is a load (vbroadcastss m32) and not a shuffle competing with FMAs.
  static type broadcast(const T* p) {
#if defined(RDN_USE_AVX) && RDN_VECTOR_BYTES == 64
    if constexpr (sizeof(T) == 4) return reinterpret_cast<type>(_mm512_set1_ps(*p));
    if constexpr (sizeof(T) == 8) return reinterpret_cast<type>(_mm512_set1_pd(*p));
#elif defined(RDN_USE_AVX) && RDN_VECTOR_BYTES == 32
    if constexpr (sizeof(T) == 4) return reinterpret_cast<type>(_mm256_broadcast_ss(p));
    if constexpr (sizeof(T) == 8) return reinterpret_cast<type>(_mm256_broadcast_sd(p));
#endif
    return type{} + *p;
  }
};

// y[dest.dest_row + r][p .. p + 2·lanes) = Σ_runs Σ_c w(dest row r, source c) · x[c][p ..], for ROWS rows.
template <typename T, int ROWS>
void rows_times_tile(const Product<T>& problem, const DestinationBlock& dest, int64_t row0) {
  using V = Vec<T>;
  using vec = typename V::type;
  constexpr int64_t step = 2 * V::lanes;
  const T* w_rows = problem.weight + (dest.weight_index + row0) * problem.weight_dest_stride;
  for (int64_t p = 0; p < problem.pixels; p += step) {
    vec acc[ROWS][2];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = vec{};
    for (int64_t run_index = 0; run_index < dest.num_runs; ++run_index) {
      const Run& run = dest.runs[run_index];
      const T* x = problem.source + run.source_row * problem.source_stride + p;
      const T* w = w_rows + run.weight_offset;
      for (int64_t c = 0; c < run.length; ++c) {
        const vec x0 = V::load(x), x1 = V::load(x + V::lanes);
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
          const vec wv = V::broadcast(w + r * problem.weight_dest_stride);
          acc[r][0] += wv * x0;
          acc[r][1] += wv * x1;
        }
        x += problem.source_stride;
        w += problem.weight_source_stride;
      }
    }
    T* y = problem.dest + (dest.dest_row + row0) * problem.dest_stride + p;
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      V::store(y + r * problem.dest_stride, acc[r][0]);
      V::store(y + r * problem.dest_stride + V::lanes, acc[r][1]);
    }
  }
}

template <typename T, int ROWS>
void remainder_rows(const Product<T>& problem, const DestinationBlock& dest, int64_t row0, int64_t rows) {
  if constexpr (ROWS > 1) {
    if (rows == ROWS) {
      rows_times_tile<T, ROWS>(problem, dest, row0);
    } else {
      remainder_rows<T, ROWS - 1>(problem, dest, row0, rows);
    }
  } else {
    rows_times_tile<T, 1>(problem, dest, row0);
  }
}

template <typename T>
void product(const Product<T>& problem) {
  for (int64_t d = 0; d < problem.num_destinations; ++d) {
    const DestinationBlock& dest = problem.destinations[d];
    int64_t row = 0;
    for (; row + RDN_ROW_BLOCK <= dest.rows; row += RDN_ROW_BLOCK) rows_times_tile<T, RDN_ROW_BLOCK>(problem, dest, row);
    if (row < dest.rows) remainder_rows<T, RDN_ROW_BLOCK - 1>(problem, dest, row, dest.rows - row);
  }
}

// dst[c][r] = src[r][c] (+ src_row_bias[r]) for a rows × cols block, element by element.
template <typename T>
void transpose_scalar(const T* src, int64_t src_stride, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                      T* dst, int64_t dst_stride, const T* src_row_bias) {
  for (int64_t r = row0; r < rows; ++r) {
    const T offset = src_row_bias ? src_row_bias[r] : T(0);
    for (int64_t c = col0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c] + offset;
  }
}

#ifdef RDN_USE_AVX
// 8×8 float transpose in registers: unpack pairs of rows, shuffle quads, swap 128-bit halves.
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, const float* bias) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  const __m256 offset = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_add_ps(_mm256_permute2f128_ps(r[i], r[i + 4], 0x20), offset));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_add_ps(_mm256_permute2f128_ps(r[i], r[i + 4], 0x31), offset));
  }
}
#endif

template <typename T>
void transpose(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride,
               const T* src_row_bias) {
  int64_t full_rows = 0, full_cols = 0;
#ifdef RDN_USE_AVX
  if constexpr (sizeof(T) == sizeof(float)) {
    full_rows = rows / 8 * 8;
    full_cols = cols / 8 * 8;
    for (int64_t r = 0; r < full_rows; r += 8) {
      for (int64_t c = 0; c < full_cols; c += 8) {
        transpose_8x8(src + r * src_stride + c, src_stride, dst + c * dst_stride + r, dst_stride,
                      src_row_bias ? src_row_bias + r : nullptr);
      }
    }
  }
#endif
  transpose_scalar(src, src_stride, 0, full_rows, full_cols, cols, dst, dst_stride, src_row_bias);
  transpose_scalar(src, src_stride, full_rows, rows, 0, cols, dst, dst_stride, src_row_bias);
}

}  // namespace

Kernels<float> float_kernels() { return {&product<float>, &transpose<float>, 2 * Vec<float>::lanes}; }
Kernels<double> double_kernels() {
  return {&product<double>, &transpose<double>, 2 * Vec<double>::lanes};
}

}  // namespace rdn::cpu::pixel_major::RDN_ISA_NAMESPACE
