// CUDA backend of the nested convolution: the torch-facing glue (nested_conv_cuda.cpp) over the
// kernels of nested_pointwise.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../cpu/nested_conv_cpu.h"  // BlockLayout, Geometry

namespace rdn {
namespace cuda {

// Output groups lo..hi-1, same contract as rdn::cpu::forward: without `out`, returns
// (N, Σ out_splits[lo:hi], H_out, W_out) in the input's memory format; with `out` (full output
// shape), writes their channel slice and returns it.
//
// 1×1 kernels with stride 1 and no padding run the nested pointwise GEMM kernels (one launch per
// up to kMaxGroupsPerLaunch groups): in place on channels_last / (N, C, 1, 1) tensors; an NCHW
// input is copied to channels_last once, and an NCHW result goes through a channels_last buffer.
// Other convolutions, and fp16 / bf16 on GPUs before sm_80 (no cp.async / mma m16n8k16), run per
// output group as cuDNN convolutions on weight and input views.
at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   const BlockLayout& layout, const Geometry& geometry, int64_t lo, int64_t hi,
                   const c10::optional<at::Tensor>& out);

// (grad_input, grad_weight, grad_bias), same contract as rdn::cpu::backward; a gradient not asked
// for is an undefined tensor. 1×1 / stride 1 / no padding: grad_input by the nested pointwise
// kernel on the transposed weight, grad_weight by one cuBLAS product per block
// run. Other convolutions: one cuDNN convolution_backward per (output group, input run).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, bool has_bias,
                                                        const BlockLayout& layout, const Geometry& geometry, int64_t lo,
                                                        int64_t hi, bool needs_input, bool needs_weight);

}  // namespace cuda
}  // namespace rdn
