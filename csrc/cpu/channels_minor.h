// Channels-minor (NHWC / (N, C)) micro-kernels of the nested 1×1 convolution, AVX-512, float.
//
// In channels_last a 1×1 convolution is Y (pixels × D) = X (pixels × C) · Wᵀ with every operand
// row-major: vectors run along OUTPUT channels, each input value X[p, c] is broadcast from memory,
// and results are stored straight into the NHWC output. No transpose of the input tile or of the
// output tile (the pixel-major kernels of pixel_major.h need both in this layout).
//
// The computed output columns are cut into blocks of up to 64 (four 16-lane vectors). A block's
// reduction visits only the input-channel ranges ("segments") that one of its columns reads; a
// vector whose lanes belong to different output groups runs a segment with a lane mask, so a lane
// never reads an input channel its group does not (exact, even for Inf/NaN in unread channels).
//
// Plain C++ interface (no torch headers); the kernels are compiled in channels_minor_avx512.cpp.
#pragma once

#include <cstdint>

namespace rdn::cpu::channels_minor {

constexpr int64_t kLanes = 16;      // floats per vector
constexpr int64_t kMaxVectors = 4;  // vectors (of output columns) per block

// Input channels [start, stop); lanes[v]: which lanes of vector v read them. Vectors before
// first_vector have no lane that does: the kernel skips them (in a lower triangle the vectors
// that read a later input group are a suffix of the block).
struct Segment {
  int64_t start, stop;
  uint16_t lanes[kMaxVectors];
  int64_t first_vector;
};

// A run of segments whose packed weights fit a core's L1 together: the reduction is done chunk by
// chunk (the first chunk initialises the output block with the bias or zero, the others add to it),
// so that a chunk's weights stay in L1 while the rows of a tile go by. Its packed weights: for
// every channel of every segment in order, vectors · 16 floats (W[column + i, c], zero where a
// lane does not read c or lies past the block).
struct Chunk {
  const Segment* segments;
  int64_t num_segments;
  const float* packed;
};

// Output columns [column, column + width) of the computed range, in lanes [head, head + width) of
// `vectors` vectors (head + width ≤ 64). The `head` lanes before the first column read nothing
// and are never stored: they put the vectors' stores on whole 64-byte lines of an output whose
// first column does not start one (a stage into a wide NHWC `out=`), since a vector store split
// across two lines costs twice the memory traffic of an aligned one.
struct ColumnBlock {
  int64_t column, width, vectors, head;
  const Chunk* chunks;
  int64_t num_chunks;
  const float* bias;  // vectors · 16 (zero past the block), or null
};

// y[p, column + i] = Σ_segments Σ_c packed · x[p, c] (+ bias) for pixels p of [row_begin, row_end).
// `stream`: write the finished vectors with non-temporal stores, which skip reading each output
// line before writing it; only valid when every full vector is a whole 64-byte line (y 64-byte
// aligned, ldy and every block's column multiples of 16), and worth it only for an output far
// larger than the caches (product() then ends with a store fence).
struct Problem {
  const float* x;
  int64_t ldx;
  float* y;
  int64_t ldy;
  const ColumnBlock* blocks;
  int64_t num_blocks;
  bool stream = false;
};

// The weight gradient of a channels-minor 1×1 product: acc[row + r, col + c] += Σ_p g[p, g_col + r] ·
// x[p, col + c] for r < rows (≤ 6) and c < cols (≤ 64), one tile per (6 output channels of one group,
// 64 input channels of one run it reads). Vectors run along input channels, g values are broadcast.
struct WeightGradientTile {
  int64_t g_col, row, rows, col, cols;
};

struct WeightGradientProblem {
  const float* g;
  int64_t ldg;
  const float* x;
  int64_t ldx;
  float* acc;
  int64_t ld_acc;
  const WeightGradientTile* tiles;
  int64_t num_tiles;
};

constexpr int64_t kGradientRows = 6;

// Adds pixels [pixel_begin, pixel_end) of every tile into problem.acc.
void weight_gradient(const WeightGradientProblem& problem, int64_t pixel_begin, int64_t pixel_end);

// Whether this CPU runs the kernels (AVX-512 F).
bool available();

// Rows [row_begin, row_end) of every block; the caller parallelises over row ranges.
void product(const Problem& problem, int64_t row_begin, int64_t row_end);

}  // namespace rdn::cpu::channels_minor
