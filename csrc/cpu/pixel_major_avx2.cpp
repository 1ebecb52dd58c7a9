// AVX2 + FMA instantiation of the pixel-major kernels: 16 ymm registers hold a 6-row × 16-pixel block.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx2,fma")
#define RDN_ISA_NAMESPACE avx2
#define RDN_USE_AVX
#define RDN_VECTOR_BYTES 32
#define RDN_ROW_BLOCK 6
#include "pixel_major_kernels.h"
