// What the CPU and CUDA backends of the nested convolution share: the block layout and geometry
// they take, the signatures of their entry points, and the layout-level helpers both use
// (channel runs, output shape, bias gradient, the per-block and the masked dense ATen backward).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace rdn {

// Channel groups and block mask of a nested layer, as offsets (K + 1 each) and a K×K mask.
struct BlockLayout {
  std::vector<int64_t> in_offsets, out_offsets;
  std::vector<bool> mask;  // row-major, mask[j * K + i]: output group j reads input group i

  int64_t num_groups() const { return static_cast<int64_t>(in_offsets.size()) - 1; }
  int64_t in_splits(int64_t i) const { return in_offsets[i + 1] - in_offsets[i]; }
  int64_t out_splits(int64_t j) const { return out_offsets[j + 1] - out_offsets[j]; }
  bool has_block(int64_t j, int64_t i) const {
    return mask[j * num_groups() + i] && in_splits(i) > 0 && out_splits(j) > 0;
  }
};

struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
};

// The entry points every backend implements; rdn::cpu and rdn::cuda declare theirs with these
// types, so the two cannot drift apart and the bindings can take either.
//
// Output groups lo..hi-1. Without `out`, returns (N, Σ out_splits[lo:hi], H_out, W_out) in the
// input's memory format; with `out` (full output shape), writes their channel slice and returns it.
using ForwardFn = at::Tensor(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                             const c10::optional<at::Tensor>& out);

// (grad_input, grad_weight, grad_bias); a gradient not asked for is an undefined tensor.
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, bool has_bias,
    const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi, bool needs_input, bool needs_weight);

// Output buffers: every tensor a backend returns with memory it is expected to write in full
// comes from these, not from at::empty. A debug switch (rdn_kernels._memory, set from Python
// through the bindings; NaN in the tests) fills them, so that an element a kernel forgets to
// write cannot pass a comparison because fresh memory happened to be zero. Only floating-point
// and complex buffers are filled.
void set_uninitialized_fill(std::optional<double> value);
std::optional<double> uninitialized_fill();
at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options);
at::Tensor empty_like(const at::Tensor& tensor);

// True when `out` provably has no two elements at one address and shares no byte with any defined
// tensor of `operands` (its address range, and ATen's internal-overlap test, decide). False means
// only "not proven": the caller then decides exactly (rdn_kernels._memory.check_out_aliasing,
// which also words the errors). The cheap first answer of that check for an op's `out=`.
bool out_provably_disjoint(const at::Tensor& out, const std::vector<std::optional<at::Tensor>>& operands);

// A half-open channel range [first, second).
using ChannelRange = std::pair<int64_t, int64_t>;

// Coalesced input-channel ranges read by output group j.
std::vector<ChannelRange> input_runs(const BlockLayout& layout, int64_t j);

// Coalesced output-channel ranges of groups lo ≤ j < hi that read input group i.
std::vector<ChannelRange> output_runs(const BlockLayout& layout, int64_t i, int64_t lo, int64_t hi);

// channels_last when the input is channels_last (and not also contiguous), else contiguous.
at::MemoryFormat memory_format_of(const at::Tensor& input);

// (N, channels, H_out, W_out) of the convolution of `input` with `weight` (D, C, kh, kw).
std::vector<int64_t> output_shape(const at::Tensor& input, const at::Tensor& weight, const Geometry& geometry,
                                  int64_t channels);

// grad_bias (D,): the sums of grad_output (the channels of groups lo..hi-1) over batch and
// pixels, zero on the other groups.
at::Tensor bias_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                         int64_t lo, int64_t hi);

// Any convolution's (grad_input, grad_weight) by one ATen convolution_backward per (output
// group, input run) on views; grad_weight (contiguous) is exactly zero outside those blocks.
std::tuple<at::Tensor, at::Tensor> general_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                    const at::Tensor& weight, const BlockLayout& layout,
                                                    const Geometry& geometry, int64_t lo, int64_t hi, bool needs_input,
                                                    bool needs_weight);

// Output channels of groups lo..hi-1 (N, their channels, H_out, W_out; the input's memory format) by
// one ATen convolution on their weight rows masked to their blocks; nullopt when they read nothing
// or have no channels.
std::optional<at::Tensor> masked_dense_forward(const at::Tensor& input, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, const BlockLayout& layout,
                                               const Geometry& geometry, int64_t lo, int64_t hi);

// The parts masked_dense_forward_into / masked_dense_backward compute with one library call each:
// groups lo..hi-1 together (dense FLOPs over the lower triangle's bounding rectangle, one call), or
// each group alone (its own rows over the input channels it reads: the useful FLOPs, K calls).
std::vector<ChannelRange> dense_parts(int64_t lo, int64_t hi, bool per_group);

// Output groups lo..hi-1 written into `output` (its channel c holds output channel out_base + c),
// one masked_dense_forward per part, copied in; a part that reads nothing gets its bias (or zero).
void masked_dense_forward_into(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                               at::Tensor& output, int64_t out_base, bool per_group);

// The same gradients by one ATen convolution_backward per part (dense_parts) on its weight rows
// masked to their blocks (zero elsewhere). grad_weight (contiguous) is exactly zero outside the
// blocks, grad_input zero on the input channels no group reads.
std::tuple<at::Tensor, at::Tensor> masked_dense_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                         const at::Tensor& weight, const BlockLayout& layout,
                                                         const Geometry& geometry, int64_t lo, int64_t hi,
                                                         bool needs_input, bool needs_weight, bool per_group = false);

}  // namespace rdn
