// Torch glue of the CUDA backend: checks, allocation, layouts, stream, dtype dispatch, and the
// packing of destination channel ranges and their source-channel runs into the kernels'
// GroupTable. The backward reuses the forward kernel for grad_input (transposed weight, the
// upper-triangular runs) and cuBLAS for grad_weight; k×k convolutions use cuDNN per block run.
#include "nested_conv_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include <limits>
#include <tuple>
#include <vector>

#include "nested_pointwise.h"

namespace rdn {
namespace cuda {
namespace {

// One destination channel range of a pointwise product and the source-channel runs it sums over.
struct Destination {
  int64_t begin, end;
  std::vector<ChannelRun> runs;
};

// The kernels' 32-bit form of channel ranges, shifted to start at channel `base`.
std::vector<ChannelRun> kernel_runs(const std::vector<ChannelRange>& ranges, int64_t base = 0) {
  std::vector<ChannelRun> runs;
  for (const auto& [begin, end] : ranges) {
    runs.push_back({static_cast<int32_t>(begin - base), static_cast<int32_t>(end - base)});
  }
  return runs;
}

bool is_pointwise(const at::Tensor& weight, const Geometry& geometry) {
  return weight.size(2) == 1 && weight.size(3) == 1 && geometry.stride == std::vector<int64_t>{1, 1} &&
         geometry.padding == std::vector<int64_t>{0, 0};
}

// Whether torch lets cuDNN convolutions compute float32 in TF32 (rdn_kernels.backends.
// cudnn_conv_allows_tf32 asks the same in Python). The query without an operator raises once the
// legacy flag (torch.backends.cudnn.allow_tf32) and the per-operator settings of torch >= 2.9
// (torch.backends.cudnn.conv.fp32_precision) disagree; the convolution's own setting is asked
// where the headers are known to have that overload (2.13 here), and elsewhere a disagreement
// means exact fp32.
bool cudnn_conv_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  try {
    return at::globalContext().allowTF32CuDNN();
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

// The fp16 / bf16 kernel uses cp.async and mma m16n8k16, which need compute capability 8.0. The
// fp32 kernel is exact fp32 (SIMT); when torch lets cuDNN convolutions use TF32 (on by default)
// fp32 goes to cuDNN per block run instead, so that the op follows the precision a dense
// convolution gets under the same flags (and its speed).
bool has_pointwise_kernel(const at::Tensor& input) {
  if (input.scalar_type() == at::kFloat) return !cudnn_conv_allows_tf32();
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

// y[:, d.begin - y_channel_base .. d.end - y_channel_base) = Σ_{run of d} x[:, run] · w[d, run]ᵀ (+ bias[d])
// for every destination d; x and y are pixel matrices, w (rows × its columns) has unit column
// stride. Packs as many destinations per launch as one GroupTable holds.
void run_pointwise(const at::Tensor& x, const void* weight, int64_t weight_row_stride, const at::Tensor& bias,
                   at::Tensor& y, int64_t y_channel_base, const std::vector<Destination>& destinations) {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  PointwiseProblem problem{};
  problem.input = x.data_ptr();
  problem.input_row_stride = x.size(1);
  problem.weight = weight;
  problem.weight_row_stride = weight_row_stride;
  problem.bias = bias.defined() ? bias.data_ptr() : nullptr;
  problem.output = y.data_ptr();
  problem.output_row_stride = y.size(1);
  problem.output_channel_base = static_cast<int32_t>(y_channel_base);
  problem.pixels = x.size(0) * x.size(2) * x.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  GroupTable& table = problem.groups;
  const auto flush = [&] {
    launch(problem, x.scalar_type(), stream);
    table.num_groups = 0;
    table.run_begin[0] = 0;
  };
  for (const Destination& destination : destinations) {
    if (destination.end == destination.begin) continue;
    TORCH_CHECK(destination.end <= kInt32Max && x.size(1) <= kInt32Max && y.size(1) <= kInt32Max,
                "rdn cuda backend: channel counts must fit in 32 bits");
    const int64_t num_runs = static_cast<int64_t>(destination.runs.size());
    TORCH_CHECK(num_runs <= kMaxRunsPerLaunch, "rdn cuda backend: channels [", destination.begin, ", ",
                destination.end, ") sum over ", num_runs, " separate channel runs; the kernel takes at most ",
                kMaxRunsPerLaunch);
    if (table.num_groups == kMaxGroupsPerLaunch || table.run_begin[table.num_groups] + num_runs > kMaxRunsPerLaunch) {
      flush();
    }
    const int g = table.num_groups++;
    table.out_begin[g] = static_cast<int32_t>(destination.begin);
    table.out_end[g] = static_cast<int32_t>(destination.end);
    int32_t run_count = table.run_begin[g];
    for (const ChannelRun& run : destination.runs) table.runs[run_count++] = run;
    table.run_begin[g + 1] = run_count;
  }
  if (table.num_groups > 0) flush();
}

// Output groups lo..hi-1 into `output`, whose channel 0 is output channel `output_channel_base`.
void pointwise_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const BlockLayout& layout, int64_t lo, int64_t hi, at::Tensor& output,
                       int64_t output_channel_base) {
  std::vector<Destination> destinations;
  for (int64_t j = lo; j < hi; ++j) {
    destinations.push_back({layout.out_offsets[j], layout.out_offsets[j + 1], kernel_runs(input_runs(layout, j))});
  }
  run_pointwise(input, weight.data_ptr(), weight.size(1), bias, output, output_channel_base, destinations);
}

// grad_input[:, c] = Σ_{o in output runs of group(c)} grad_output[:, o] · W[o, c]: the same nested
// product with the transposed weight (C × D, made contiguous once; small next to activations).
// Input channels that no computed group reads (groups ≥ hi) get a destination without runs: zero.
void pointwise_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const BlockLayout& layout,
                          int64_t lo, int64_t hi, at::Tensor& grad_input) {
  const int64_t base = layout.out_offsets[lo];
  const at::Tensor weight_t = weight.view({weight.size(0), weight.size(1)}).t().contiguous();
  // Columns of grad_output are output channels from `base`: start the weight rows there too.
  const void* weight_from_base = static_cast<const char*>(weight_t.data_ptr()) + base * weight_t.element_size();
  std::vector<Destination> destinations;
  for (int64_t i = 0; i < hi; ++i) {
    destinations.push_back(
        {layout.in_offsets[i], layout.in_offsets[i + 1], kernel_runs(output_runs(layout, i, lo, hi), base)});
  }
  destinations.push_back({layout.in_offsets[hi], grad_input.size(1), {}});
  run_pointwise(grad_output, weight_from_base, weight_t.size(1), at::Tensor(), grad_input, 0, destinations);
}

// grad_weight[group j rows, run] = grad_output[:, j]ᵀ · input[:, run] (cuBLAS, one product per
// block run); every other entry stays exactly zero.
at::Tensor pointwise_grad_weight(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const BlockLayout& layout, int64_t lo, int64_t hi) {
  const auto as_rows = [](const at::Tensor& t) {  // pixel matrix (N, C, H, W) → (N·H·W, C) view
    return t.permute({0, 2, 3, 1}).reshape({t.size(0) * t.size(2) * t.size(3), t.size(1)});
  };
  const at::Tensor grad_rows = as_rows(grad_output), input_rows = as_rows(input);
  at::Tensor grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  const at::Tensor grad_matrix = grad_weight.view({weight.size(0), weight.size(1)});
  const int64_t base = layout.out_offsets[lo];
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
    if (width == 0) continue;
    const at::Tensor grad_group = grad_rows.narrow(1, out_start - base, width).t();
    for (const auto& [start, stop] : input_runs(layout, j)) {
      grad_matrix.narrow(0, out_start, width)
          .narrow(1, start, stop - start)
          .copy_(at::mm(grad_group, input_rows.narrow(1, start, stop - start)));
    }
  }
  return grad_weight;
}

// k×k or strided convolutions (and fp16 / bf16 before sm_80, fp32 under TF32): per output group,
// cuDNN convolutions over its input runs, their partial sums accumulated in fp32 (a 16-bit sum
// would round once per run on top of cuDNN's own fp32 accumulation).
void general_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi, at::Tensor& output,
                     int64_t output_channel_base) {
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t out_start = layout.out_offsets[j], width = layout.out_splits(j);
    if (width == 0) continue;
    at::Tensor target = output.narrow(1, out_start - output_channel_base, width);
    c10::optional<at::Tensor> group_bias;
    if (bias) group_bias = bias->narrow(0, out_start, width);
    const auto runs = input_runs(layout, j);
    const bool widen = runs.size() > 1 && input.scalar_type() != at::kFloat;
    at::Tensor sum;
    for (const auto& [start, stop] : runs) {
      at::Tensor term = at::conv2d(input.narrow(1, start, stop - start),
                                   weight.narrow(0, out_start, width).narrow(1, start, stop - start),
                                   sum.defined() ? c10::nullopt : group_bias, geometry.stride, geometry.padding,
                                   geometry.dilation);
      if (widen) term = term.to(at::kFloat);
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

void check_operands(const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), "rdn cuda backend: expected CUDA tensors, got input on ",
              input.device(), " and weight on ", weight.device());
  const auto type = input.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "rdn cuda backend: supports float32, float16 and bfloat16, got ", type);
}

}  // namespace

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                   const c10::optional<at::Tensor>& out) {
  check_operands(input, weight);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor weight_c = weight.contiguous();
  const c10::optional<at::Tensor> bias_c = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const int64_t channels = layout.out_offsets[hi] - layout.out_offsets[lo];
  const auto shape = output_shape(input, weight, geometry, channels);

  if (!is_pointwise(weight, geometry) || !has_pointwise_kernel(input)) {
    at::Tensor output = out ? *out : rdn::empty(shape, input.options().memory_format(memory_format_of(input)));
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
  at::Tensor result = rdn::empty(shape, input.options().memory_format(memory_format_of(input)));
  if (!is_pixel_matrix(result)) {
    result = rdn::empty(shape, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  pointwise_forward(pixels, weight_c, bias_tensor, layout, lo, hi, result, layout.out_offsets[lo]);
  if (out) {
    out->narrow(1, layout.out_offsets[lo], channels).copy_(result);
    return *out;
  }
  return result.contiguous(memory_format_of(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, bool has_bias,
                                                        const BlockLayout& layout, const Geometry& geometry, int64_t lo,
                                                        int64_t hi, bool needs_input, bool needs_weight) {
  check_operands(input, weight);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor grad_input, grad_weight;
  const at::Tensor grad_bias = has_bias ? bias_gradient(grad_output, weight, layout, lo, hi) : at::Tensor();
  if (!is_pointwise(weight, geometry) || !has_pointwise_kernel(input)) {
    std::tie(grad_input, grad_weight) =
        general_backward(grad_output, input, weight_c, layout, geometry, lo, hi, needs_input, needs_weight);
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor grad_pixels = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input_pixels = input.contiguous(at::MemoryFormat::ChannelsLast);
  if (needs_input) {  // in the input's layout (what the op's fake reports), via channels_last if needed
    grad_input = rdn::empty_like(input);
    at::Tensor target = is_pixel_matrix(grad_input)
                            ? grad_input
                            : rdn::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
    pointwise_grad_input(grad_pixels, weight_c, layout, lo, hi, target);
    if (!target.is_same(grad_input)) grad_input.copy_(target);
  }
  if (needs_weight) grad_weight = pointwise_grad_weight(grad_pixels, input_pixels, weight_c, layout, lo, hi);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace rdn
