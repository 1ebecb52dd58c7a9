// CUDA backend of the nested convolution: the torch-facing glue (nested_conv_cuda.cpp) over the
// kernels of nested_pointwise.h.
#pragma once

#include "../nested_conv_common.h"  // BlockLayout, Geometry, ForwardFn, BackwardFn

namespace rdn {
namespace cuda {

// Output groups lo..hi-1, the contract of ForwardFn (same as rdn::cpu::forward).
//
// 1×1 kernels with stride 1 and no padding run the nested pointwise GEMM kernels (one launch per
// up to kMaxGroupsPerLaunch groups): in place on channels_last / (N, C, 1, 1) tensors; an NCHW
// input is copied to channels_last once, and an NCHW result goes through a channels_last buffer.
// Other convolutions, and fp16 / bf16 on GPUs before sm_80 (no cp.async / mma m16n8k16), run per
// output group as cuDNN convolutions on weight and input views.
ForwardFn forward;

// (grad_input, grad_weight, grad_bias), the contract of BackwardFn (same as rdn::cpu::backward).
// 1×1 / stride 1 / no padding: grad_input by the nested pointwise kernel on the transposed weight,
// grad_weight by one cuBLAS product per block run. Other convolutions: one cuDNN
// convolution_backward per (output group, input run).
BackwardFn backward;

}  // namespace cuda
}  // namespace rdn
