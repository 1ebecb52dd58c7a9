// Baseline instantiation of the pixel-major kernels (SSE2 on x86-64, NEON-width elsewhere),
// and the run-time choice of the best instantiation this CPU supports.
#include <cstdint>
#include <cstring>
#define RDN_ISA_NAMESPACE generic
#define RDN_VECTOR_BYTES 16
#define RDN_ROW_BLOCK 6
#include "pixel_major_kernels.h"

namespace rdn::cpu::pixel_major {
namespace {

enum class Isa { kAvx512, kAvx2, kGeneric };

#if defined(__x86_64__)
#define RDN_HAS_X86_KERNELS 1
#endif

Isa best_isa() {
#ifdef RDN_HAS_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

}  // namespace

const Kernels<float>& float_kernels() {
  static const Kernels<float> kernels = [] {
    switch (best_isa()) {
#ifdef RDN_HAS_X86_KERNELS
      case Isa::kAvx512: return avx512::float_kernels();
      case Isa::kAvx2: return avx2::float_kernels();
#endif
      default: return generic::float_kernels();
    }
  }();
  return kernels;
}

const Kernels<double>& double_kernels() {
  static const Kernels<double> kernels = [] {
    switch (best_isa()) {
#ifdef RDN_HAS_X86_KERNELS
      case Isa::kAvx512: return avx512::double_kernels();
      case Isa::kAvx2: return avx2::double_kernels();
#endif
      default: return generic::double_kernels();
    }
  }();
  return kernels;
}

}  // namespace rdn::cpu::pixel_major
