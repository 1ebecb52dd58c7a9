// C++ CPU kernels of the nested (block-lower-triangular) convolution.
//
// 1×1 convolutions and linear layers (stride 1, no padding) are a GEMM over pixels:
// Y[p, o] = Σ_c X[p, c] · W[o, c]. The block triangle is covered by one GEMM per
// (destination group, run of contiguous source channels) on strided views of the operands
// — no copy of the input, no masked copy of the weight. Pixels are cut into tiles small enough
// that a tile of X stays in cache while every output group of that tile is computed, and the
// tiles run in parallel; inside a parallel region BLAS runs single-threaded.
//
// Other convolutions run per output group on ATen (oneDNN) convolutions of weight and input
// views, which measures faster here than an im2col GEMM of our own.

#include "nested_conv_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <climits>
#include <vector>

extern "C" {
// Fortran BLAS, provided by the BLAS that libtorch_cpu links (MKL on x86-64 wheels).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}

namespace rdn {
namespace cpu {
namespace {

// A strided 2-D view; one of the two strides is 1 (or the dimension it steps over is 1).
template <typename T>
struct Matrix {
  T* data;
  int64_t rows, cols, row_stride, col_stride;

  Matrix block(int64_t row, int64_t num_rows, int64_t col, int64_t num_cols) const {
    return {data + row * row_stride + col * col_stride, num_rows, num_cols, row_stride, col_stride};
  }
  Matrix transposed() const { return {data, cols, rows, col_stride, row_stride}; }
  bool column_major() const { return row_stride == 1 || rows == 1; }
};

void blas_gemm(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
               float beta, float* c, int ldc) {
  const float alpha = 1.f;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

void blas_gemm(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
               double beta, double* c, int ldc) {
  const double alpha = 1.;
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

int checked_int(int64_t value) {
  TORCH_CHECK(value <= INT_MAX, "rdn cpp backend: GEMM dimension ", value, " exceeds the 32-bit BLAS interface");
  return static_cast<int>(value);
}

// Column-major view of an operand for BLAS: transpose flag and leading dimension.
template <typename T>
std::pair<char, int64_t> blas_operand(const Matrix<T>& m) {
  if (m.column_major()) return {'N', std::max<int64_t>(m.col_stride, std::max<int64_t>(m.rows, 1))};
  TORCH_INTERNAL_ASSERT(m.col_stride == 1 || m.cols == 1, "rdn cpp backend: operand has no unit stride");
  return {'T', std::max<int64_t>(m.row_stride, std::max<int64_t>(m.cols, 1))};
}

// c = a · b + beta · c
template <typename T>
void gemm(const Matrix<const T>& a, const Matrix<const T>& b, const Matrix<T>& c, T beta) {
  if (c.rows == 0 || c.cols == 0) return;
  if (!c.column_major()) {  // row-major c: compute cᵀ = bᵀ · aᵀ, which is column-major
    gemm(b.transposed(), a.transposed(), c.transposed(), beta);
    return;
  }
  auto [ta, lda] = blas_operand(a);
  auto [tb, ldb] = blas_operand(b);
  const int64_t ldc = std::max<int64_t>(c.col_stride, std::max<int64_t>(c.rows, 1));
  blas_gemm(ta, tb, checked_int(c.rows), checked_int(c.cols), checked_int(a.cols), a.data, checked_int(lda),
            b.data, checked_int(ldb), beta, c.data, checked_int(ldc));
}

template <typename T>
void fill_block(const Matrix<T>& c, const T* column_values) {
  const bool rows_inner = c.row_stride == 1;
  const int64_t outer = rows_inner ? c.cols : c.rows, inner = rows_inner ? c.rows : c.cols;
  const int64_t outer_stride = rows_inner ? c.col_stride : c.row_stride;
  const int64_t inner_stride = rows_inner ? 1 : c.col_stride;
  for (int64_t o = 0; o < outer; ++o) {
    T* line = c.data + o * outer_stride;
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t col = rows_inner ? o : i;
      line[i * inner_stride] = column_values ? column_values[col] : T(0);
    }
  }
}

template <typename T>
void add_to_columns(const Matrix<T>& c, const T* column_values) {
  const bool rows_inner = c.row_stride == 1;
  if (rows_inner) {
    for (int64_t col = 0; col < c.cols; ++col) {
      T* line = c.data + col * c.col_stride;
      const T value = column_values[col];
      for (int64_t row = 0; row < c.rows; ++row) line[row] += value;
    }
  } else {
    for (int64_t row = 0; row < c.rows; ++row) {
      T* line = c.data + row * c.row_stride;
      for (int64_t col = 0; col < c.cols; ++col) line[col * c.col_stride] += column_values[col];
    }
  }
}

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
  bool flattenable() const { return samples <= 1 || sample_stride == rows * row_stride; }
  PixelMatrix flattened() const { return {data, 1, samples * rows, cols, samples * rows * row_stride, row_stride, col_stride}; }
  Matrix<T> sample(int64_t n) const { return {data + n * sample_stride, rows, cols, row_stride, col_stride}; }
};

template <typename A, typename C>
void flatten_together(PixelMatrix<A>& a, PixelMatrix<C>& c) {
  if (a.flattenable() && c.flattenable() && a.row_stride != 1 && c.row_stride != 1) {
    a = a.flattened();
    c = c.flattened();
  }
}

struct Run {
  int64_t a_col, b_row, length;
};

// One destination channel range of C and the runs of source channels it sums over.
template <typename T>
struct Destination {
  int64_t c_col, b_col, width;
  std::vector<Run> runs;
  const T* bias;  // width values, or nullptr
};

std::vector<std::pair<int64_t, int64_t>> coalesce(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (const auto& range : ranges) {
    if (range.second == range.first) continue;
    if (!runs.empty() && runs.back().second == range.first) {
      runs.back().second = range.second;
    } else {
      runs.push_back(range);
    }
  }
  return runs;
}

// Input channel runs read by output group j.
std::vector<std::pair<int64_t, int64_t>> input_runs(const BlockLayout& layout, int64_t j) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t i = 0; i <= j; ++i) {
    if (layout.has_block(j, i)) ranges.emplace_back(layout.in_offsets[i], layout.in_offsets[i + 1]);
  }
  return coalesce(ranges);
}

// Output channel runs of groups lo ≤ j < hi that read input group i.
std::vector<std::pair<int64_t, int64_t>> output_runs(const BlockLayout& layout, int64_t i, int64_t lo, int64_t hi) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t j = std::max(lo, i); j < hi; ++j) {
    if (layout.has_block(j, i)) ranges.emplace_back(layout.out_offsets[j], layout.out_offsets[j + 1]);
  }
  return coalesce(ranges);
}

// Rows per tile: a tile of A and C should stay in a core's L2 while all destinations run.
int64_t tile_rows(int64_t total_rows, int64_t bytes_per_row, int64_t tasks_wanted) {
  constexpr int64_t kTileBytes = 512 * 1024;
  int64_t rows = std::max<int64_t>(kTileBytes / std::max<int64_t>(bytes_per_row, 1), 64);
  rows = std::min(rows, std::max<int64_t>(64, (total_rows + tasks_wanted - 1) / tasks_wanted));
  return std::max<int64_t>(std::min(rows, total_rows), 1);
}

// C[:, dest] = Σ_runs A[:, run] · B[run, dest] (+ bias) for every destination, tile by tile.
template <typename T>
void blocked_gemm(PixelMatrix<const T> a, const Matrix<const T>& b, PixelMatrix<T> c,
                  const std::vector<Destination<T>>& destinations) {
  flatten_together(a, c);
  const int64_t threads = at::get_num_threads();
  const int64_t rows = tile_rows(c.rows, (a.cols + c.cols) * sizeof(T), std::max<int64_t>(1, 4 * threads / c.samples));
  const int64_t tiles_per_sample = (c.rows + rows - 1) / rows;
  at::parallel_for(0, c.samples * tiles_per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles_per_sample, row = (task % tiles_per_sample) * rows;
      const int64_t num_rows = std::min(rows, c.rows - row);
      const Matrix<const T> a_tile = a.sample(n).block(row, num_rows, 0, a.cols);
      const Matrix<T> c_tile = c.sample(n).block(row, num_rows, 0, c.cols);
      for (const auto& dest : destinations) {
        const Matrix<T> out = c_tile.block(0, num_rows, dest.c_col, dest.width);
        if (dest.width == 0) continue;
        if (dest.runs.empty()) {
          fill_block(out, dest.bias);
          continue;
        }
        T beta = 0;
        for (const auto& run : dest.runs) {
          gemm(a_tile.block(0, num_rows, run.a_col, run.length), b.block(run.b_row, run.length, dest.b_col, dest.width),
               out, beta);
          beta = 1;
        }
        if (dest.bias) add_to_columns(out, dest.bias);
      }
    }
  });
}

template <typename T>
Matrix<const T> weight_matrix(const at::Tensor& weight) {  // (D, C, 1, 1) as D × C
  return {weight.data_ptr<T>(), weight.size(0), weight.size(1), weight.stride(0), weight.stride(1)};
}

template <typename T>
void pointwise_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const BlockLayout& layout, int64_t lo, int64_t hi, at::Tensor& output, int64_t out_base) {
  std::vector<Destination<T>> destinations;
  const T* bias_data = bias ? bias->data_ptr<T>() : nullptr;
  for (int64_t j = lo; j < hi; ++j) {
    Destination<T> dest{layout.out_offsets[j] - out_base, layout.out_offsets[j], layout.out_splits(j), {},
                        bias_data ? bias_data + layout.out_offsets[j] : nullptr};
    for (const auto& [start, stop] : input_runs(layout, j)) dest.runs.push_back({start, start, stop - start});
    destinations.push_back(std::move(dest));
  }
  blocked_gemm<T>(PixelMatrix<const T>::of(input), weight_matrix<T>(weight).transposed(), PixelMatrix<T>::of(output),
                  destinations);
}

template <typename T>
void pointwise_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                          int64_t lo, int64_t hi, at::Tensor& grad_input) {
  const int64_t base = layout.out_offsets[lo];
  std::vector<Destination<T>> destinations;
  for (int64_t i = 0; i < hi; ++i) {
    Destination<T> dest{layout.in_offsets[i], layout.in_offsets[i], layout.in_splits(i), {}, nullptr};
    for (const auto& [start, stop] : output_runs(layout, i, lo, hi)) dest.runs.push_back({start - base, start, stop - start});
    destinations.push_back(std::move(dest));
  }
  // Input channels of groups ≥ hi are not read by these stages: their gradient is zero.
  const int64_t prefix = layout.in_offsets[hi];
  destinations.push_back({prefix, prefix, grad_input.size(1) - prefix, {}, nullptr});
  blocked_gemm<T>(PixelMatrix<const T>::of(grad_output), weight_matrix<T>(weight), PixelMatrix<T>::of(grad_input),
                  destinations);
}

// grad_weight[j-block, run] = Σ_pixels grad_output[:, j]ᵀ · input[:, run]; one accumulator per
// thread, summed at the end. Blocks outside the mask are never touched and stay exactly zero.
template <typename T>
at::Tensor pointwise_grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const BlockLayout& layout, int64_t lo, int64_t hi) {
  const int64_t threads = at::get_num_threads();
  const int64_t base = layout.out_offsets[lo];
  auto a = PixelMatrix<const T>::of(grad_output);
  auto x = PixelMatrix<const T>::of(input);
  if (a.flattenable() && x.flattenable() && a.row_stride != 1 && x.row_stride != 1) {
    a = a.flattened();
    x = x.flattened();
  }
  const int64_t rows = tile_rows(a.rows, (a.cols + x.cols) * sizeof(T), std::max<int64_t>(1, 2 * threads / a.samples));
  const int64_t tiles_per_sample = (a.rows + rows - 1) / rows;
  const int64_t tasks = a.samples * tiles_per_sample;
  const int64_t accumulators = std::min(threads, tasks);
  at::Tensor partial = at::zeros({accumulators, weight.size(0), weight.size(1)}, weight.options());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> runs(hi);
  for (int64_t j = lo; j < hi; ++j) runs[j] = input_runs(layout, j);
  at::parallel_for(0, accumulators, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      T* acc_data = partial.data_ptr<T>() + slot * weight.size(0) * weight.size(1);
      const Matrix<T> acc{acc_data, weight.size(0), weight.size(1), weight.size(1), 1};
      for (int64_t task = slot; task < tasks; task += accumulators) {
        const int64_t n = task / tiles_per_sample, row = (task % tiles_per_sample) * rows;
        const int64_t num_rows = std::min(rows, a.rows - row);
        const Matrix<const T> a_tile = a.sample(n).block(row, num_rows, 0, a.cols);
        const Matrix<const T> x_tile = x.sample(n).block(row, num_rows, 0, x.cols);
        for (int64_t j = lo; j < hi; ++j) {
          const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
          if (width == 0) continue;
          for (const auto& [start, stop] : runs[j]) {
            gemm(a_tile.block(0, num_rows, out_start - base, width).transposed(),
                 x_tile.block(0, num_rows, start, stop - start), acc.block(out_start, width, start, stop - start), T(1));
          }
        }
      }
    }
  });
  return (accumulators == 1 ? partial[0] : partial.sum(0)).view(weight.sizes());
}

bool is_pixel_matrix(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

bool use_pointwise(const at::Tensor& input, const at::Tensor& weight, const Geometry& geometry) {
  return weight.size(2) == 1 && weight.size(3) == 1 && geometry.stride == std::vector<int64_t>{1, 1} &&
         geometry.padding == std::vector<int64_t>{0, 0} && is_pixel_matrix(input) &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

at::MemoryFormat memory_format_of(const at::Tensor& input) {
  return (!input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> output_shape(const at::Tensor& input, const at::Tensor& weight, const Geometry& geometry,
                                  int64_t channels) {
  std::vector<int64_t> shape{input.size(0), channels};
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t span = geometry.dilation[axis] * (weight.size(2 + axis) - 1) + 1;
    shape.push_back((input.size(2 + axis) + 2 * geometry.padding[axis] - span) / geometry.stride[axis] + 1);
  }
  return shape;
}

// k×k (or strided) convolution: per output group, ATen convolutions over its input runs.
void general_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi, at::Tensor& output,
                     int64_t out_base) {
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
    if (width == 0) continue;
    at::Tensor target = output.narrow(1, out_start - out_base, width);
    const auto runs = input_runs(layout, j);
    c10::optional<at::Tensor> group_bias;
    if (bias) group_bias = bias->narrow(0, out_start, width);
    if (runs.empty()) {
      if (group_bias) {
        target.copy_(group_bias->view({1, width, 1, 1}).expand_as(target));
      } else {
        target.zero_();
      }
      continue;
    }
    at::Tensor sum;
    for (size_t r = 0; r < runs.size(); ++r) {
      const auto [start, stop] = runs[r];
      at::Tensor term = at::conv2d(input.narrow(1, start, stop - start),
                                   weight.narrow(0, out_start, width).narrow(1, start, stop - start),
                                   r == 0 ? group_bias : c10::nullopt, geometry.stride, geometry.padding,
                                   geometry.dilation);
      sum = r == 0 ? term : sum.add_(term);
    }
    target.copy_(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> general_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                    const at::Tensor& weight, const BlockLayout& layout,
                                                    const Geometry& geometry, int64_t lo, int64_t hi, bool needs_input,
                                                    bool needs_weight) {
  at::Tensor grad_input = needs_input ? at::zeros_like(input) : at::Tensor();
  at::Tensor grad_weight = needs_weight ? at::zeros_like(weight) : at::Tensor();
  const int64_t base = layout.out_offsets[lo];
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
    if (width == 0) continue;
    const at::Tensor grad_group = grad_output.narrow(1, out_start - base, width);
    for (const auto& [start, stop] : input_runs(layout, j)) {
      auto [block_input, block_weight, unused] = at::convolution_backward(
          grad_group, input.narrow(1, start, stop - start), weight.narrow(0, out_start, width).narrow(1, start, stop - start),
          c10::nullopt, geometry.stride, geometry.padding, geometry.dilation, false, {0, 0}, 1,
          {needs_input, needs_weight, false});
      if (needs_input) grad_input.narrow(1, start, stop - start).add_(block_input);
      if (needs_weight) grad_weight.narrow(0, out_start, width).narrow(1, start, stop - start).copy_(block_weight);
    }
  }
  return {grad_input, grad_weight};
}

}  // namespace

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                   const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(input.device().is_cpu(), "rdn cpp backend: expected CPU tensors");
  const at::Tensor weight_c = weight.contiguous();
  const int64_t channels = layout.out_offsets[hi] - layout.out_offsets[lo];
  at::Tensor output = out ? *out : at::empty(output_shape(input, weight, geometry, channels),
                                             input.options().memory_format(memory_format_of(input)));
  const int64_t out_base = out ? 0 : layout.out_offsets[lo];
  if (use_pointwise(input, weight, geometry) && is_pixel_matrix(output)) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rdn_pointwise_forward", [&] {
      pointwise_forward<scalar_t>(input, weight_c, bias, layout, lo, hi, output, out_base);
    });
  } else {
    general_forward(input, weight_c, bias, layout, geometry, lo, hi, output, out_base);
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, bool has_bias,
                                                        const BlockLayout& layout, const Geometry& geometry, int64_t lo,
                                                        int64_t hi, bool needs_input, bool needs_weight) {
  TORCH_CHECK(input.device().is_cpu(), "rdn cpp backend: expected CPU tensors");
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor grad_input, grad_weight, grad_bias;
  if (has_bias) {
    grad_bias = at::zeros({weight.size(0)}, weight.options());
    const int64_t base = layout.out_offsets[lo];
    grad_bias.narrow(0, base, layout.out_offsets[hi] - base).copy_(grad_output.sum({0, 2, 3}));
  }
  if (use_pointwise(input, weight, geometry) && is_pixel_matrix(grad_output)) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rdn_pointwise_backward", [&] {
      if (needs_input) {
        grad_input = at::empty_like(input);
        pointwise_grad_input<scalar_t>(grad_output, weight_c, layout, lo, hi, grad_input);
      }
      if (needs_weight) grad_weight = pointwise_grad_weight<scalar_t>(grad_output, input, weight_c, layout, lo, hi);
    });
  } else {
    std::tie(grad_input, grad_weight) =
        general_backward(grad_output, input, weight_c, layout, geometry, lo, hi, needs_input, needs_weight);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace rdn
