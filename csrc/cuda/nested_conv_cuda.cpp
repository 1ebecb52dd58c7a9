// Torch glue of the CUDA backend: checks, allocation, layouts, stream, dtype dispatch, and the
// packing of output groups and their input-channel runs into the kernels' GroupTable.
#include "nested_conv_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <vector>

#include "nested_pointwise.h"

namespace rdn {
namespace cuda {
namespace {

// Coalesced input-channel runs read by output group j.
std::vector<ChannelRun> input_runs(const BlockLayout& layout, int64_t j) {
  std::vector<ChannelRun> runs;
  for (int64_t i = 0; i <= j; ++i) {
    if (!layout.has_block(j, i)) continue;
    const auto begin = static_cast<int32_t>(layout.in_offsets[i]), end = static_cast<int32_t>(layout.in_offsets[i + 1]);
    if (!runs.empty() && runs.back().end == begin) {
      runs.back().end = end;
    } else {
      runs.push_back({begin, end});
    }
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

bool is_pointwise(const at::Tensor& weight, const Geometry& geometry) {
  return weight.size(2) == 1 && weight.size(3) == 1 && geometry.stride == std::vector<int64_t>{1, 1} &&
         geometry.padding == std::vector<int64_t>{0, 0};
}

// The fp16 / bf16 kernel uses cp.async and mma m16n8k16, which need compute capability 8.0.
bool has_pointwise_kernel(const at::Tensor& input) {
  if (input.scalar_type() == at::kFloat) return true;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, input.get_device()));
  return major >= 8;
}

// A (N, C, H, W) tensor the kernels index directly: pixel p = (n, h, w) at p · C, channel stride 1.
bool is_pixel_matrix(const at::Tensor& t) { return t.is_contiguous(at::MemoryFormat::ChannelsLast); }

void launch(const PointwiseProblem& problem, at::ScalarType type, cudaStream_t stream) {
  cudaError_t error = cudaSuccess;
  switch (type) {
    case at::kFloat: error = launch_nested_pointwise_f32(problem, stream); break;
    case at::kHalf: error = launch_nested_pointwise_f16(problem, stream); break;
    case at::kBFloat16: error = launch_nested_pointwise_bf16(problem, stream); break;
    default: TORCH_CHECK(false, "rdn cuda backend: no pointwise kernel for ", type);
  }
  C10_CUDA_CHECK(error);
}

// Y[:, groups lo..hi-1] of `output` (a pixel matrix whose channel 0 is output channel
// `output_channel_base`), packing as many groups per launch as one GroupTable holds.
void pointwise_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const BlockLayout& layout, int64_t lo, int64_t hi, at::Tensor& output,
                       int64_t output_channel_base) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(weight.size(0) <= kInt32Max && weight.size(1) <= kInt32Max,
              "rdn cuda backend: channel counts must fit in 32 bits, got weight ", weight.sizes());
  PointwiseProblem problem{};
  problem.input = input.data_ptr();
  problem.input_row_stride = input.size(1);
  problem.weight = weight.data_ptr();
  problem.weight_row_stride = weight.size(1);
  problem.bias = bias.defined() ? bias.data_ptr() : nullptr;
  problem.output = output.data_ptr();
  problem.output_row_stride = output.size(1);
  problem.output_channel_base = static_cast<int32_t>(output_channel_base);
  problem.pixels = input.size(0) * input.size(2) * input.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GroupTable& table = problem.groups;
  const auto flush = [&] {
    launch(problem, input.scalar_type(), stream);
    table.num_groups = 0;
    table.run_begin[0] = 0;
  };
  for (int64_t j = lo; j < hi; ++j) {
    if (layout.out_splits(j) == 0) continue;
    const std::vector<ChannelRun> runs = input_runs(layout, j);
    TORCH_CHECK(static_cast<int64_t>(runs.size()) <= kMaxRunsPerLaunch, "rdn cuda backend: output group ", j,
                " reads ", runs.size(), " separate input-channel runs; the kernel takes at most ", kMaxRunsPerLaunch);
    if (table.num_groups == kMaxGroupsPerLaunch ||
        table.run_begin[table.num_groups] + static_cast<int64_t>(runs.size()) > kMaxRunsPerLaunch) {
      flush();
    }
    const int g = table.num_groups++;
    table.out_begin[g] = static_cast<int32_t>(layout.out_offsets[j]);
    table.out_end[g] = static_cast<int32_t>(layout.out_offsets[j + 1]);
    int32_t run_count = table.run_begin[g];
    for (const ChannelRun& run : runs) table.runs[run_count++] = run;
    table.run_begin[g + 1] = run_count;
  }
  if (table.num_groups > 0) flush();
}

// k×k or strided convolutions (and fp16 / bf16 before sm_80): per output group, cuDNN
// convolutions over its input runs.
void general_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi, at::Tensor& output,
                     int64_t output_channel_base) {
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
    if (width == 0) continue;
    at::Tensor target = output.narrow(1, out_start - output_channel_base, width);
    c10::optional<at::Tensor> group_bias;
    if (bias) group_bias = bias->narrow(0, out_start, width);
    at::Tensor sum;
    for (const ChannelRun& run : input_runs(layout, j)) {
      at::Tensor term = at::conv2d(input.narrow(1, run.begin, run.end - run.begin),
                                   weight.narrow(0, out_start, width).narrow(1, run.begin, run.end - run.begin),
                                   sum.defined() ? c10::nullopt : group_bias, geometry.stride, geometry.padding,
                                   geometry.dilation);
      sum = sum.defined() ? sum.add_(term) : term;
    }
    if (sum.defined()) {
      target.copy_(sum);
    } else if (group_bias) {  // a group that reads no input channels is its bias
      target.copy_(group_bias->view({1, width, 1, 1}).expand_as(target));
    } else {
      target.zero_();
    }
  }
}

}  // namespace

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                   const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), "rdn cuda backend: expected CUDA tensors, got input on ",
              input.device(), " and weight on ", weight.device());
  const auto type = input.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "rdn cuda backend: supports float32, float16 and bfloat16, got ", type);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor weight_c = weight.contiguous();
  const c10::optional<at::Tensor> bias_c = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const int64_t channels = layout.out_offsets[hi] - layout.out_offsets[lo];
  const auto shape = output_shape(input, weight, geometry, channels);

  if (!is_pointwise(weight, geometry) || !has_pointwise_kernel(input)) {
    at::Tensor output = out ? *out : at::empty(shape, input.options().memory_format(memory_format_of(input)));
    general_forward(input, weight_c, bias_c, layout, geometry, lo, hi, output, out ? 0 : layout.out_offsets[lo]);
    return output;
  }
  // The kernels take pixel matrices: NCHW operands are copied to channels_last (documented path).
  const at::Tensor pixels = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor bias_tensor = bias_c ? *bias_c : at::Tensor();
  if (out && is_pixel_matrix(*out)) {  // write straight into the channel slice of `out`
    at::Tensor target = *out;
    pointwise_forward(pixels, weight_c, bias_tensor, layout, lo, hi, target, 0);
    return target;
  }
  // The result in the input's format when the kernels can write that directly (channels_last, or
  // (N, C, 1, 1)), else in a channels_last buffer converted below.
  at::Tensor result = at::empty(shape, input.options().memory_format(memory_format_of(input)));
  if (!is_pixel_matrix(result)) result = at::empty(shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  pointwise_forward(pixels, weight_c, bias_tensor, layout, lo, hi, result, layout.out_offsets[lo]);
  if (out) {
    out->narrow(1, layout.out_offsets[lo], channels).copy_(result);
    return *out;
  }
  return result.contiguous(memory_format_of(input));
}

}  // namespace cuda
}  // namespace rdn
