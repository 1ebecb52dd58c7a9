// fp32 kernel of the nested pointwise GEMM: a SIMT tiled GEMM in exact fp32 (no TF32).
//
// A 64 × 64 block tile of Y, 256 threads computing 4 × 4 outputs each from 16-channel K-steps
// held in shared memory. Tiles are stored K-outer ([k][pixel], [k][channel]) so the inner
// product reads float4 along pixels and output channels. The next K-step is loaded into
// registers while the current one is multiplied. Loads are guarded element loads, so any channel
// offset and row stride works (no alignment assumptions).
#include <type_traits>

#include "nested_pointwise_tiles.cuh"

namespace rdn {
namespace cuda {
namespace {

constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 16;
constexpr int kThreadM = 4, kThreadN = 4;
constexpr int kThreadsM = kBlockM / kThreadM, kThreadsN = kBlockN / kThreadN;
constexpr int kThreads = kThreadsM * kThreadsN;
// Each thread loads kLoadK consecutive channels of one row of each operand per K-step.
constexpr int kLoadK = kBlockM * kBlockK / kThreads;
// 4 floats of padding keep rows 16-byte aligned for the float4 reads and halve the bank
// conflicts of the transposing stores.
constexpr int kPitch = kBlockM + 4;

static_assert(kBlockM == kBlockN, "X and W tiles share the load mapping");
static_assert(kLoadK * kThreads == kBlockM * kBlockK && kBlockK % kLoadK == 0, "whole rows of K per thread group");

// kLoadK channels [channel, channel + kLoadK) ∩ [.., channel_limit) of row `row`; zero elsewhere.
__device__ __forceinline__ void load_fragment(float (&fragment)[kLoadK], const float* base, int64_t row_stride,
                                              int64_t row, int64_t row_limit, int32_t channel,
                                              int32_t channel_limit) {
  const float* source = base + row * row_stride + channel;
#pragma unroll
  for (int e = 0; e < kLoadK; ++e) {
    fragment[e] = row < row_limit && channel + e < channel_limit ? source[e] : 0.f;
  }
}

// Instantiated for float only; the template argument puts the dtype into the kernel's symbol,
// where the static check (rdn_kernels/nested_conv/cuda_static_check.py) reads it.
template <typename T>
__global__ void __launch_bounds__(kThreads) nested_pointwise_simt_kernel(const __grid_constant__ PointwiseProblem problem) {
  static_assert(std::is_same<T, float>::value, "the SIMT kernel computes in exact fp32");
  __shared__ alignas(16) float x_tile[kBlockK][kPitch];
  __shared__ alignas(16) float w_tile[kBlockK][kPitch];

  const GroupTable& table = problem.groups;
  const detail::BlockTile block = detail::locate_block_tile<kBlockM, kBlockN>(table);
  const auto* x = static_cast<const T*>(problem.input);
  const auto* w = static_cast<const T*>(problem.weight);

  // Loading: thread t fills row t / (kBlockK / kLoadK) of both tiles, channels kLoadK · (t % …).
  const int load_row = static_cast<int>(threadIdx.x) / (kBlockK / kLoadK);
  const int load_k = (static_cast<int>(threadIdx.x) % (kBlockK / kLoadK)) * kLoadK;
  // Computing: thread t owns pixels 4 · (t / 16) + {0..3} and channels 4 · (t % 16) + {0..3}.
  const int thread_m = (static_cast<int>(threadIdx.x) / kThreadsN) * kThreadM;
  const int thread_n = (static_cast<int>(threadIdx.x) % kThreadsN) * kThreadN;

  float acc[kThreadM][kThreadN] = {};
  float x_next[kLoadK], w_next[kLoadK];
  detail::RunCursor cursor(table, block.group);
  auto load_next = [&] {
    load_fragment(x_next, x, problem.input_row_stride, block.pixel_begin + load_row, problem.pixels,
                  cursor.channel + load_k, cursor.limit());
    load_fragment(w_next, w, problem.weight_row_stride, block.channel_begin + load_row, block.channel_end,
                  cursor.channel + load_k, cursor.limit());
    cursor.advance(kBlockK);
  };

  const int k_steps = detail::count_k_steps(table, block.group, kBlockK);
  if (k_steps > 0) load_next();
  for (int step = 0; step < k_steps; ++step) {
#pragma unroll
    for (int e = 0; e < kLoadK; ++e) {
      x_tile[load_k + e][load_row] = x_next[e];
      w_tile[load_k + e][load_row] = w_next[e];
    }
    __syncthreads();
    if (step + 1 < k_steps) load_next();  // in flight during the products below
#pragma unroll
    for (int k = 0; k < kBlockK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&x_tile[k][thread_m]);
      const float4 b = *reinterpret_cast<const float4*>(&w_tile[k][thread_n]);
      const float av[kThreadM] = {a.x, a.y, a.z, a.w}, bv[kThreadN] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < kThreadM; ++i)
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }

  const auto* bias = static_cast<const T*>(problem.bias);
  auto* y = static_cast<T*>(problem.output);
#pragma unroll
  for (int j = 0; j < kThreadN; ++j) {
    const int32_t channel = block.channel_begin + thread_n + j;
    if (channel >= block.channel_end) continue;
    const float channel_bias = bias != nullptr ? bias[channel] : 0.f;
#pragma unroll
    for (int i = 0; i < kThreadM; ++i) {
      const int64_t pixel = block.pixel_begin + thread_m + i;
      if (pixel < problem.pixels) {
        y[pixel * problem.output_row_stride + (channel - problem.output_channel_base)] = acc[i][j] + channel_bias;
      }
    }
  }
}

}  // namespace

cudaError_t launch_nested_pointwise_f32(const PointwiseProblem& problem, cudaStream_t stream) {
  return detail::launch_tiles<kBlockM, kBlockN>(nested_pointwise_simt_kernel<float>, kThreads, problem, stream);
}

}  // namespace cuda
}  // namespace rdn
