// Parts shared by the nested pointwise kernels: the tile table (blockIdx → group, output-channel
// tile, pixel tile), the walk over a group's input-channel runs in K-steps, and the launch.
#pragma once

#include <climits>
#include <cstdint>

#include "nested_pointwise.h"

namespace rdn {
namespace cuda {
namespace detail {

// The block's share of the output: pixels [pixel_begin, pixel_begin + BlockM) ∩ [0, pixels) and
// output channels [channel_begin, channel_end), all inside one group.
struct BlockTile {
  int group;
  int64_t pixel_begin;
  int32_t channel_begin, channel_end;
};

// Consecutive blocks take the output tiles of one pixel tile in turn, so a tile of X is read from
// DRAM once and from L2 by the other output tiles.
template <int BlockM, int BlockN>
__device__ __forceinline__ BlockTile locate_block_tile(const GroupTable& table) {
  const int32_t tiles = table.tile_begin[table.num_groups];
  const int32_t tile = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(tiles));
  const int64_t pixel_tile = blockIdx.x / static_cast<uint32_t>(tiles);
  int group = 0;
  while (group + 1 < table.num_groups && tile >= table.tile_begin[group + 1]) ++group;
  const int32_t begin = table.out_begin[group] + (tile - table.tile_begin[group]) * BlockN;
  return {group, pixel_tile * BlockM, begin, min(begin + BlockN, table.out_end[group])};
}

// Walks the input-channel runs of one group, BlockK channels at a time; the last step of a run
// may be partial (`limit()` is where the run ends) and never crosses into the next run. Empty
// runs are skipped, so the steps taken always equal count_k_steps.
struct RunCursor {
  const GroupTable& table;
  int run, run_stop;
  int32_t channel;

  __device__ RunCursor(const GroupTable& t, int group)
      : table(t), run(t.run_begin[group]), run_stop(t.run_begin[group + 1]), channel(0) {
    enter_run();
  }
  __device__ bool valid() const { return run < run_stop; }
  __device__ int32_t limit() const { return table.runs[run].end; }
  __device__ void advance(int block_k) {
    channel += block_k;
    if (channel >= table.runs[run].end) {
      ++run;
      enter_run();
    }
  }

 private:
  __device__ void enter_run() {
    while (run < run_stop && table.runs[run].begin >= table.runs[run].end) ++run;
    if (run < run_stop) channel = table.runs[run].begin;
  }
};

__device__ __forceinline__ int count_k_steps(const GroupTable& table, int group, int block_k) {
  int steps = 0;
  for (int run = table.run_begin[group]; run < table.run_begin[group + 1]; ++run) {
    steps += max(0, table.runs[run].end - table.runs[run].begin + block_k - 1) / block_k;
  }
  return steps;
}

// Fills table.tile_begin for tiles of `block_n` output channels; returns the number of tiles.
inline int64_t fill_tile_table(GroupTable& table, int block_n) {
  int64_t tiles = 0;
  for (int group = 0; group < table.num_groups; ++group) {
    table.tile_begin[group] = static_cast<int32_t>(tiles);
    tiles += (table.out_end[group] - table.out_begin[group] + block_n - 1) / block_n;
  }
  table.tile_begin[table.num_groups] = static_cast<int32_t>(tiles);
  return tiles;
}

// One block per (pixel tile, output tile), on a 1-D grid (2^31 - 1 blocks, no 65535 limit).
template <int BlockM, int BlockN, typename Kernel>
cudaError_t launch_tiles(Kernel kernel, int threads, PointwiseProblem problem, cudaStream_t stream) {
  if (problem.groups.num_groups <= 0 || problem.groups.num_groups > kMaxGroupsPerLaunch) {
    return problem.groups.num_groups == 0 ? cudaSuccess : cudaErrorInvalidValue;
  }
  const int64_t tiles = fill_tile_table(problem.groups, BlockN);
  const int64_t pixel_tiles = (problem.pixels + BlockM - 1) / BlockM;
  const int64_t blocks = tiles * pixel_tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(problem);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace rdn
