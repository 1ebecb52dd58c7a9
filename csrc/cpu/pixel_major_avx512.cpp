// AVX-512 instantiation of the pixel-major kernels: 32 zmm registers hold an 8-row × 32-pixel block.
#include <cstdint>
#include <cstring>
#pragma GCC target("avx512f,avx512vl,fma")
#define RDN_ISA_NAMESPACE avx512
#define RDN_USE_AVX
#define RDN_VECTOR_BYTES 64
#define RDN_ROW_BLOCK 8
#include "pixel_major_kernels.h"
