// Tensor-core kernel of the nested pointwise GEMM for fp16 / bf16 (fp32 accumulation).
//
// CUTLASS-style tiling written out by hand: a 128 × 64 block tile of Y, 4 warps of 64 × 32,
// each warp issuing mma.sync m16n8k16 on fragments read with ldmatrix. X and W tiles of 32
// channels go through a 3-stage shared-memory ring filled with cp.async, so the loads of the
// next two K-steps are in flight while the current one is multiplied. Both operands are K-major
// (X is pixels × channels, W is out-channels × channels), which is exactly the row.col form of
// the mma, so no operand is transposed anywhere.
//
// cp.async needs 16-byte aligned sources: when every run starts on a multiple of 8 channels and
// the row strides and base pointers are 16-byte aligned, the kernel runs with vector loads;
// otherwise the same kernel is instantiated with guarded element loads (ragged channel offsets
// such as groups of 7 channels). Out-of-range pixels, channels past a run's end and output
// channels past the group's end are zero-filled in shared memory, so the MMA loop needs no bounds
// checks; a warp only skips the MMA tiles that lie wholly past the last pixel or channel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nested_pointwise_tiles.cuh"

namespace rdn {
namespace cuda {
namespace {

constexpr int kBlockM = 128, kBlockN = 64, kBlockK = 32;
constexpr int kWarpsM = 2, kWarpsN = 2, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;
constexpr int kMmaTilesM = kWarpM / kMmaM, kMmaTilesN = kWarpN / kMmaN;
constexpr int kStages = 3;
constexpr int kChunk = 8;  // 16-bit elements per 16-byte copy
constexpr int kChunksPerRow = kBlockK / kChunk;
// Row pitch of the shared tiles: 8 extra elements (16 bytes) move each row 4 banks further, so
// 8 consecutive rows at one column fall in 8 distinct 4-bank groups: the 8 row addresses of an
// ldmatrix phase, and the 8 chunks of a 16-byte store phase (see load_tile), are conflict-free.
constexpr int kPitch = kBlockK + kChunk;

static_assert(kWarpM % kMmaM == 0 && kWarpN % kMmaN == 0 && kBlockK % kMmaK == 0, "warp tiles are whole MMAs");
static_assert(kMmaTilesN % 2 == 0, "B fragments are read two n-tiles per ldmatrix.x4");
static_assert(kStages >= 2, "the ring needs a stage in flight beside the one multiplied");
static_assert((kBlockM * kChunksPerRow) % kThreads == 0 && (kBlockN * kChunksPerRow) % kThreads == 0,
              "every thread copies the same number of chunks");
static_assert(kThreads % (8 * kChunksPerRow) == 0, "a warp's chunks cover whole groups of 8 rows");

template <typename T>
__device__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

#define RDN_DEFINE_MMA(TYPE, PTX_TYPE)                                                                  \
  template <>                                                                                           \
  __device__ __forceinline__ void mma_m16n8k16<TYPE>(float(&acc)[4], const uint32_t(&a)[4],             \
                                                     const uint32_t(&b)[2]) {                           \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                         \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"               \
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])                               \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                   \
  }
RDN_DEFINE_MMA(__half, "f16")
RDN_DEFINE_MMA(__nv_bfloat16, "bf16")
#undef RDN_DEFINE_MMA

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ void store_pair(T* dst, float x, float y);
template <>
__device__ __forceinline__ void store_pair<__half>(__half* dst, float x, float y) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x, y);
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* dst, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x, y);
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies `bytes` (0..16) from global memory and zero-fills the rest of the 16-byte chunk.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&fragment)[4], const uint16_t* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(shared)));
}

using SharedTile = uint16_t[kPitch];  // one row of a shared operand tile, raw 16-bit storage

// Rows × kBlockK elements of a K-major operand (row r = global row first_row + r, channels
// [channel, channel + kBlockK) clipped to channel_limit; rows ≥ row_limit read as zero).
template <int Rows, bool kVector>
__device__ __forceinline__ void load_tile(SharedTile* tile, const uint16_t* base, int64_t row_stride,
                                          int64_t first_row, int64_t row_limit, int32_t channel,
                                          int32_t channel_limit) {
#pragma unroll
  for (int step = 0; step < Rows * kChunksPerRow / kThreads; ++step) {
    // 8 consecutive chunks (one 16-byte store phase) go down 8 rows at one column: with the padded
    // pitch their shared addresses fall in 8 distinct bank groups. A warp still reads whole 64-byte
    // row segments from global memory.
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    const int row = (chunk / (8 * kChunksPerRow)) * 8 + chunk % 8;
    const int column = ((chunk / 8) % kChunksPerRow) * kChunk;
    const int64_t global_row = first_row + row;
    const int32_t first = channel + column;
    const int valid = global_row < row_limit ? max(0, min(kChunk, channel_limit - first)) : 0;
    const uint16_t* source = base + global_row * row_stride + first;
    if (kVector) {
      // A zero-byte copy still needs a valid address: point it at the operand's base.
      cp_async_16(&tile[row][column], valid > 0 ? source : base, valid * 2);
    } else {
      uint32_t words[kChunk / 2];
#pragma unroll
      for (int pair = 0; pair < kChunk / 2; ++pair) {
        const uint32_t low = 2 * pair < valid ? source[2 * pair] : 0u;
        const uint32_t high = 2 * pair + 1 < valid ? source[2 * pair + 1] : 0u;
        words[pair] = low | (high << 16);
      }
      *reinterpret_cast<uint4*>(&tile[row][column]) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) nested_pointwise_mma_kernel(const __grid_constant__ PointwiseProblem problem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // cp.async and mma m16n8k16 need sm_80; the glue sends older GPUs to cuDNN instead. This
  // branch only keeps builds that also target older architectures compiling.
  __trap();
#else
  __shared__ alignas(16) uint16_t x_tiles[kStages][kBlockM][kPitch];
  __shared__ alignas(16) uint16_t w_tiles[kStages][kBlockN][kPitch];

  const GroupTable& table = problem.groups;
  const detail::BlockTile block = detail::locate_block_tile<kBlockM, kBlockN>(table);
  const auto* x = static_cast<const uint16_t*>(problem.input);
  const auto* w = static_cast<const uint16_t*>(problem.weight);

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  // MMA tiles of this warp that hold any real pixel / output channel; the rest are skipped.
  const int64_t warp_rows = problem.pixels - block.pixel_begin - warp_m * kWarpM;
  const int warp_cols = block.channel_end - block.channel_begin - warp_n * kWarpN;
  const int active_m = warp_rows <= 0 ? 0 : static_cast<int>(min(static_cast<int64_t>(kMmaTilesM), (warp_rows + kMmaM - 1) / kMmaM));
  const int active_n = max(0, min(kMmaTilesN, (warp_cols + kMmaN - 1) / kMmaN));

  float acc[kMmaTilesM][kMmaTilesN][4];
#pragma unroll
  for (int mt = 0; mt < kMmaTilesM; ++mt)
#pragma unroll
    for (int nt = 0; nt < kMmaTilesN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  detail::RunCursor cursor(table, block.group);
  auto load_stage = [&](int stage) {
    if (cursor.valid()) {
      load_tile<kBlockM, kVector>(x_tiles[stage], x, problem.input_row_stride, block.pixel_begin, problem.pixels,
                                  cursor.channel, cursor.limit());
      load_tile<kBlockN, kVector>(w_tiles[stage], w, problem.weight_row_stride, block.channel_begin,
                                  block.channel_end, cursor.channel, cursor.limit());
      cursor.advance(kBlockK);
    }
    cp_async_commit();  // an empty group when done keeps the wait counts uniform
  };

  const int k_steps = detail::count_k_steps(table, block.group, kBlockK);
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) load_stage(stage);

  for (int step = 0; step < k_steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `step` is visible, and everyone is done with the stage refilled next
    load_stage((step + kStages - 1) % kStages);
    const int stage = step % kStages;
    if (active_m == 0 || active_n == 0) continue;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kMmaK) {
      uint32_t a[kMmaTilesM][4], b[kMmaTilesN][2];
#pragma unroll
      for (int mt = 0; mt < kMmaTilesM; ++mt) {
        ldmatrix_x4(a[mt], &x_tiles[stage][warp_m * kWarpM + mt * kMmaM + lane % 16][kk + (lane / 16) * 8]);
      }
#pragma unroll
      for (int np = 0; np < kMmaTilesN / 2; ++np) {
        uint32_t pair[4];
        ldmatrix_x4(pair, &w_tiles[stage][warp_n * kWarpN + np * 2 * kMmaN + (lane / 16) * 8 + lane % 8]
                                      [kk + ((lane / 8) % 2) * 8]);
        b[2 * np][0] = pair[0];
        b[2 * np][1] = pair[1];
        b[2 * np + 1][0] = pair[2];
        b[2 * np + 1][1] = pair[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMmaTilesM; ++mt)
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt)
          if (mt < active_m && nt < active_n) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[nt]);
    }
  }
  cp_async_wait<0>();

  // Accumulator (mt, nt, e) holds row lane / 4 (+ 8 for e ≥ 2), columns 2 · (lane % 4) + {0, 1}.
  const auto* bias = static_cast<const T*>(problem.bias);
  auto* y = static_cast<T*>(problem.output);
#pragma unroll
  for (int nt = 0; nt < kMmaTilesN; ++nt) {
    const int32_t channel = block.channel_begin + warp_n * kWarpN + nt * kMmaN + (lane % 4) * 2;
    const bool first_ok = channel < block.channel_end, second_ok = channel + 1 < block.channel_end;
    const float bias0 = bias != nullptr && first_ok ? to_float(bias[channel]) : 0.f;
    const float bias1 = bias != nullptr && second_ok ? to_float(bias[channel + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < kMmaTilesM; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t pixel = block.pixel_begin + warp_m * kWarpM + mt * kMmaM + lane / 4 + half * 8;
        if (pixel >= problem.pixels || !first_ok) continue;
        T* dst = y + pixel * problem.output_row_stride + (channel - problem.output_channel_base);
        const float v0 = acc[mt][nt][2 * half] + bias0, v1 = acc[mt][nt][2 * half + 1] + bias1;
        if (second_ok && reinterpret_cast<uintptr_t>(dst) % 4 == 0) {
          store_pair<T>(dst, v0, v1);
        } else {
          dst[0] = from_float<T>(v0);
          if (second_ok) dst[1] = from_float<T>(v1);
        }
      }
    }
  }
#endif
}

// cp.async copies 16 bytes: every row start and every run start must be 16-byte aligned.
bool vector_loads_allowed(const PointwiseProblem& problem) {
  const auto aligned = [](const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; };
  if (!aligned(problem.input) || !aligned(problem.weight) || problem.input_row_stride % kChunk != 0 ||
      problem.weight_row_stride % kChunk != 0) {
    return false;
  }
  const GroupTable& table = problem.groups;
  for (int run = 0; run < table.run_begin[table.num_groups]; ++run) {
    if (table.runs[run].begin % kChunk != 0) return false;
  }
  return true;
}

template <typename T>
cudaError_t launch(const PointwiseProblem& problem, cudaStream_t stream) {
  if (vector_loads_allowed(problem)) {
    return detail::launch_tiles<kBlockM, kBlockN>(nested_pointwise_mma_kernel<T, true>, kThreads, problem, stream);
  }
  return detail::launch_tiles<kBlockM, kBlockN>(nested_pointwise_mma_kernel<T, false>, kThreads, problem, stream);
}

}  // namespace

cudaError_t launch_nested_pointwise_f16(const PointwiseProblem& problem, cudaStream_t stream) {
  return launch<__half>(problem, stream);
}

cudaError_t launch_nested_pointwise_bf16(const PointwiseProblem& problem, cudaStream_t stream) {
  return launch<__nv_bfloat16>(problem, stream);
}

}  // namespace cuda
}  // namespace rdn
