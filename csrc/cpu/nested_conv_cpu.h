// C++ CPU kernels of the nested convolution (see nested_conv_cpu.cpp).
#pragma once

#include "../nested_conv_common.h"  // BlockLayout, Geometry, ForwardFn, BackwardFn

namespace rdn {
namespace cpu {

// at::Tensor forward(input, weight, bias, layout, geometry, lo, hi, out): the contract of ForwardFn.
ForwardFn forward;

// (grad_input, grad_weight, grad_bias) = backward(grad_output, input, weight, has_bias, layout,
// geometry, lo, hi, needs_input, needs_weight): the contract of BackwardFn.
BackwardFn backward;

}  // namespace cpu
}  // namespace rdn
