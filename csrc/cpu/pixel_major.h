// Interface of the pixel-major micro-kernels (pixel_major_kernels.h), compiled once per ISA.
//
// A "tile" is a pixel-major buffer: row c holds `pixels` consecutive pixels of channel c
// (`pixels` a multiple of Kernels::pixel_multiple, padded with zeros).
#pragma once

#include <cstdint>

namespace rdn::cpu::pixel_major {

// Source rows [source_row, source_row + length) of the tile; source row source_row + c is
// multiplied by the weight element at weight_offset + c · weight_source_stride (plus the
// destination row's offset).
struct Run {
  int64_t source_row, weight_offset, length;
};

// Destination rows [dest_row, dest_row + rows), weight destination indices [weight_index, ...):
// each row is the sum over `runs` of weight · source.
struct DestinationBlock {
  int64_t dest_row, weight_index, rows;
  const Run* runs;
  int64_t num_runs;
};

// dest[dest_row + r][p] = Σ_runs Σ_c weight[(weight_index + r) · weight_dest_stride + run.weight_offset
//                                           + c · weight_source_stride] · source[run.source_row + c][p]
template <typename T>
struct Product {
  const T* source;
  int64_t source_stride;
  const T* weight;
  int64_t weight_dest_stride, weight_source_stride;
  T* dest;
  int64_t dest_stride;
  int64_t pixels;
  const DestinationBlock* destinations;
  int64_t num_destinations;
};

template <typename T>
struct Kernels {
  void (*product)(const Product<T>&);
  // dst[c][r] = src[r][c] (+ src_row_bias[r]): packs NHWC tiles pixel-major and back.
  void (*transpose)(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride,
                    const T* src_row_bias);
  int64_t pixel_multiple;
};

// The best kernels this CPU runs (AVX-512, AVX2+FMA, or baseline SSE2), chosen once.
const Kernels<float>& float_kernels();
const Kernels<double>& double_kernels();

#define RDN_DECLARE_ISA(isa)            \
  namespace isa {                       \
  Kernels<float> float_kernels();       \
  Kernels<double> double_kernels();     \
  }
RDN_DECLARE_ISA(avx512)
RDN_DECLARE_ISA(avx2)
RDN_DECLARE_ISA(generic)
#undef RDN_DECLARE_ISA

}  // namespace rdn::cpu::pixel_major
