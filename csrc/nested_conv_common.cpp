// Layout-level helpers shared by the CPU and CUDA backends (see nested_conv_common.h).
#include "nested_conv_common.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace rdn {
namespace {

// Appends [begin, end) to `runs`, merged with the last range when they touch; empty ranges are dropped.
void append_run(std::vector<ChannelRange>& runs, int64_t begin, int64_t end) {
  if (begin == end) return;
  if (!runs.empty() && runs.back().second == begin) {
    runs.back().second = end;
  } else {
    runs.emplace_back(begin, end);
  }
}

// The debug fill of output buffers: set rarely (from Python), read by every allocation.
std::atomic<bool> fill_enabled{false};
std::atomic<double> fill_value{0.0};

at::Tensor filled(at::Tensor buffer) {
  if (fill_enabled.load(std::memory_order_relaxed) &&
      (at::isFloatingType(buffer.scalar_type()) || at::isComplexType(buffer.scalar_type()))) {
    buffer.fill_(fill_value.load(std::memory_order_relaxed));
  }
  return buffer;
}

}  // namespace

void set_uninitialized_fill(std::optional<double> value) {
  fill_value.store(value.value_or(0.0));
  fill_enabled.store(value.has_value());
}

std::optional<double> uninitialized_fill() {
  return fill_enabled.load() ? std::optional<double>(fill_value.load()) : std::nullopt;
}

at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) { return filled(at::empty(size, options)); }

at::Tensor empty_like(const at::Tensor& tensor) { return filled(at::empty_like(tensor)); }

namespace {

// [first byte, one past the last byte) that `tensor` addresses; (0, 0) when it has no elements.
std::pair<std::uintptr_t, std::uintptr_t> address_span(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return {0, 0};
  int64_t last = 0;  // element offset of the last element (torch strides are never negative)
  for (int64_t d = 0; d < tensor.dim(); ++d) last += (tensor.size(d) - 1) * tensor.stride(d);
  const auto start = reinterpret_cast<std::uintptr_t>(tensor.data_ptr());
  return {start, start + static_cast<std::uintptr_t>((last + 1) * tensor.element_size())};
}

}  // namespace

bool out_provably_disjoint(const at::Tensor& out, const std::vector<std::optional<at::Tensor>>& operands) {
  if (at::has_internal_overlap(out) != at::MemOverlap::No) return false;
  const auto [out_start, out_end] = address_span(out);
  if (out_start == out_end) return true;
  for (const auto& operand : operands) {
    if (!operand || !operand->defined()) continue;
    const auto [start, end] = address_span(*operand);
    if (start != end && start < out_end && out_start < end) return false;
  }
  return true;
}

std::vector<ChannelRange> input_runs(const BlockLayout& layout, int64_t j) {
  std::vector<ChannelRange> runs;
  for (int64_t i = 0; i <= j; ++i) {
    if (layout.has_block(j, i)) append_run(runs, layout.in_offsets[i], layout.in_offsets[i + 1]);
  }
  return runs;
}

std::vector<ChannelRange> output_runs(const BlockLayout& layout, int64_t i, int64_t lo, int64_t hi) {
  std::vector<ChannelRange> runs;
  for (int64_t j = std::max(lo, i); j < hi; ++j) {
    if (layout.has_block(j, i)) append_run(runs, layout.out_offsets[j], layout.out_offsets[j + 1]);
  }
  return runs;
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

at::Tensor bias_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                         int64_t lo, int64_t hi) {
  at::Tensor grad_bias = at::zeros({weight.size(0)}, weight.options());
  const int64_t base = layout.out_offsets[lo];
  grad_bias.narrow(0, base, layout.out_offsets[hi] - base).copy_(grad_output.sum({0, 2, 3}));
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor> general_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                    const at::Tensor& weight, const BlockLayout& layout,
                                                    const Geometry& geometry, int64_t lo, int64_t hi, bool needs_input,
                                                    bool needs_weight) {
  // An input channel sums the grads of every output group that reads it: in fp32 for 16-bit inputs
  // (one rounding at the end, not one per block), converted back below.
  const bool widen = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  at::Tensor grad_input =
      needs_input ? at::zeros_like(input, widen ? input.options().dtype(at::kFloat) : input.options()) : at::Tensor();
  at::Tensor grad_weight = needs_weight ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::Tensor();
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
  if (needs_input && widen) grad_input = grad_input.to(input.scalar_type());
  return {grad_input, grad_weight};
}

namespace {

// The weight rows of groups lo..hi-1 over the input channels they read (up to the end of the last
// run), with every entry outside their blocks set to zero (selected, not multiplied: a non-finite
// value there must not reach the output), and the bool mask (rows, columns, 1, 1) that did it.
// columns == 0 when no group reads anything. When every group reads all `columns` channels (one
// stage of a lower triangle) the rows are the weight itself and `mask` is undefined: no copy.
struct MaskedRows {
  at::Tensor weight, mask;
  int64_t first_row, rows, columns;
};

MaskedRows masked_rows(const at::Tensor& weight, const BlockLayout& layout, int64_t lo, int64_t hi) {
  MaskedRows result{at::Tensor(), at::Tensor(), layout.out_offsets[lo],
                    layout.out_offsets[hi] - layout.out_offsets[lo], 0};
  for (int64_t j = lo; j < hi; ++j) {
    for (const auto& run : input_runs(layout, j)) result.columns = std::max(result.columns, run.second);
  }
  if (result.rows == 0 || result.columns == 0) return result;
  bool rectangle = true;
  for (int64_t j = lo; j < hi && rectangle; ++j) {
    const auto runs = input_runs(layout, j);
    rectangle = layout.out_splits(j) == 0 ||
                (runs.size() == 1 && runs[0].first == 0 && runs[0].second == result.columns);
  }
  if (rectangle) {
    result.weight = weight.narrow(0, result.first_row, result.rows).narrow(1, 0, result.columns);
    return result;
  }
  result.mask = at::zeros({result.rows, result.columns, 1, 1}, weight.options().dtype(at::kBool));
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t width = layout.out_splits(j);
    if (width == 0) continue;
    for (const auto& [start, stop] : input_runs(layout, j)) {
      result.mask.narrow(0, layout.out_offsets[j] - result.first_row, width).narrow(1, start, stop - start).fill_(true);
    }
  }
  result.weight = at::where(result.mask, weight.narrow(0, result.first_row, result.rows).narrow(1, 0, result.columns),
                            at::zeros({}, weight.options()));
  return result;
}

}  // namespace

std::optional<at::Tensor> masked_dense_forward(const at::Tensor& input, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, const BlockLayout& layout,
                                               const Geometry& geometry, int64_t lo, int64_t hi) {
  const MaskedRows masked = masked_rows(weight, layout, lo, hi);
  if (masked.rows == 0 || masked.columns == 0) return std::nullopt;
  const c10::optional<at::Tensor> rows_bias =
      bias ? c10::optional<at::Tensor>(bias->narrow(0, masked.first_row, masked.rows)) : c10::nullopt;
  return at::convolution(input.narrow(1, 0, masked.columns), masked.weight, rows_bias, geometry.stride,
                         geometry.padding, geometry.dilation, false, {0, 0}, 1)
      .contiguous(memory_format_of(input));
}

std::vector<ChannelRange> dense_parts(int64_t lo, int64_t hi, bool per_group) {
  if (!per_group) return {{lo, hi}};
  // Widest reader first: in the backward its grad_input covers every channel the others add to.
  std::vector<ChannelRange> parts;
  for (int64_t j = hi - 1; j >= lo; --j) parts.emplace_back(j, j + 1);
  return parts;
}

void masked_dense_forward_into(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                               at::Tensor& output, int64_t out_base, bool per_group) {
  for (const auto& [first, last] : dense_parts(lo, hi, per_group)) {
    const int64_t start = layout.out_offsets[first], width = layout.out_offsets[last] - start;
    if (width == 0) continue;
    at::Tensor slice = output.narrow(1, start - out_base, width);
    if (auto part = masked_dense_forward(input, weight, bias, layout, geometry, first, last)) {
      slice.copy_(*part);
    } else if (bias) {
      slice.copy_(bias->narrow(0, start, width).view({1, width, 1, 1}));
    } else {
      slice.zero_();
    }
  }
}

std::tuple<at::Tensor, at::Tensor> masked_dense_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                         const at::Tensor& weight, const BlockLayout& layout,
                                                         const Geometry& geometry, int64_t lo, int64_t hi,
                                                         bool needs_input, bool needs_weight, bool per_group) {
  at::Tensor grad_input, grad_weight;
  if (needs_weight) grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  for (const auto& [first, last] : dense_parts(lo, hi, per_group)) {
    const MaskedRows masked = masked_rows(weight, layout, first, last);
    if (masked.rows == 0 || masked.columns == 0) continue;
    auto [block_input, block_weight, unused] = at::convolution_backward(
        grad_output.narrow(1, masked.first_row - layout.out_offsets[lo], masked.rows),
        input.narrow(1, 0, masked.columns), masked.weight, c10::nullopt, geometry.stride, geometry.padding,
        geometry.dilation, false, {0, 0}, 1, {needs_input, needs_weight, false});
    if (needs_input) {
      if (!grad_input.defined() && masked.columns == input.size(1)) {
        grad_input = block_input.contiguous(memory_format_of(input));
      } else {
        if (!grad_input.defined()) grad_input = at::zeros_like(input);
        grad_input.narrow(1, 0, masked.columns).add_(block_input);
      }
    }
    if (needs_weight) {
      grad_weight.narrow(0, masked.first_row, masked.rows)
          .narrow(1, 0, masked.columns)
          .copy_(masked.mask.defined() ? at::where(masked.mask, block_weight, at::zeros({}, block_weight.options()))
                                       : block_weight);
    }
  }
  if (needs_input && !grad_input.defined()) grad_input = at::zeros_like(input);
  return {grad_input, grad_weight};
}

}  // namespace rdn
