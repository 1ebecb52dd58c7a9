// Nested 1×1 convolution / nested linear as one GEMM launch over pixels (CUDA kernels).
//
// Plain C++ interface (no torch): raw pointers, sizes, strides and a stream. Operands are
// pixels × channels matrices with unit channel stride (channels_last or (N, C) tensors):
//
//     Y[p, o - output_channel_base] = Σ_{c in runs of group(o)} X[p, c] · W[o, c] + b[o]
//
// for the output channels o of every group in the table. One launch covers all its groups: a
// block computes one (pixel tile, output-channel tile) pair, and the tile's reduction loop walks
// only the input-channel runs of the tile's group. The backward's grad_input is the same product
// with X = grad_output, W = Wᵀ and the transposed runs (see nested_conv_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rdn {
namespace cuda {

// Launch limits of one GroupTable; the torch glue splits larger layers into several launches.
constexpr int kMaxGroupsPerLaunch = 32;
constexpr int kMaxRunsPerLaunch = 64;

struct ChannelRun {
  int32_t begin, end;  // half-open range of input channels (columns of X and W)
};

// Output groups of one launch and the input-channel runs each one reduces over.
struct GroupTable {
  int32_t num_groups;
  int32_t out_begin[kMaxGroupsPerLaunch];  // first output channel (row of W, entry of b) of group g
  int32_t out_end[kMaxGroupsPerLaunch];
  int32_t run_begin[kMaxGroupsPerLaunch + 1];  // runs of group g: runs[run_begin[g] .. run_begin[g + 1])
  ChannelRun runs[kMaxRunsPerLaunch];
  // Filled by the launcher (it knows the kernel's tile width): output tiles of group g are
  // tile_begin[g] .. tile_begin[g + 1] - 1. This is the tile table that maps blockIdx to a group.
  int32_t tile_begin[kMaxGroupsPerLaunch + 1];
};

struct PointwiseProblem {
  const void* input;        // X: pixels × input_row_stride, element (p, c) at p * input_row_stride + c
  int64_t input_row_stride;
  const void* weight;       // W: element (o, c) at o * weight_row_stride + c
  int64_t weight_row_stride;
  const void* bias;         // b: indexed by output channel o, or nullptr
  void* output;             // Y: element (p, o) at p * output_row_stride + (o - output_channel_base)
  int64_t output_row_stride;
  int32_t output_channel_base;
  int64_t pixels;
  GroupTable groups;
};

// X, W, b and Y share one element type; accumulation is fp32. fp16 / bf16 run the tensor-core
// kernel (nested_pointwise_mma.cu, mma.sync m16n8k16), fp32 the SIMT kernel
// (nested_pointwise_simt.cu). Each returns the launch error, if any, and enqueues nothing when
// there is nothing to compute.
cudaError_t launch_nested_pointwise_f32(const PointwiseProblem& problem, cudaStream_t stream);
cudaError_t launch_nested_pointwise_f16(const PointwiseProblem& problem, cudaStream_t stream);
cudaError_t launch_nested_pointwise_bf16(const PointwiseProblem& problem, cudaStream_t stream);

}  // namespace cuda
}  // namespace rdn
