// Vector loads and stores of the CPU kernel: moves a fixed span of parameter or state entries
// between memory and two Vectorized<acc_t> registers, widening bf16/fp16 to fp32 on the way.
//
// ATen's vec headers pick their instruction set from CPU_CAPABILITY, which torch defines only
// when it builds its own per-ISA kernels. An extension that leaves it undefined gets the
// generic (scalar-emulated) Vectorized<>, so this header defines it for AVX2 builds (x86-64
// builds get -mavx2 -mfma, see rmda_fused/_extension.py). The definition only works before
// the first ATen vec include of a translation unit: include this header before any of them.
#pragma once

#if defined(__AVX2__) && !defined(CPU_CAPABILITY)
#if defined(VECTOR_WIDTH)  // set by ATen/cpu/vec/vec_base.h: a vec header came first
#error "include cpu/vec_io.h before any ATen/cpu/vec header, or the kernel loses AVX2"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace rmda_fused::cpu {

using at::vec::Vectorized;

// Moves kStep consecutive elements between memory of scalar_t and two Vectorized<acc_t>
// (the low and high halves of the span): the widest span a bf16/fp16 load fills, kept for
// fp32/fp64 too so that parameters and fp32 state advance in the same steps.
template <typename scalar_t, typename acc_t>
struct VecIO {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const scalar_t* src, Vec& low, Vec& high) {
    low = Vec::loadu(src);
    high = Vec::loadu(src + Vec::size());
  }
  static void store(scalar_t* dst, const Vec& low, const Vec& high) {
    low.store(dst);
    high.store(dst + Vec::size());
  }
};

// bf16 and fp16 parameters are computed in fp32: one load widens 2 * Vec::size() entries.
template <typename reduced_t>
struct ReducedIO {
  using Vec = Vectorized<float>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load(const reduced_t* src, Vec& low, Vec& high) {
    at::vec::load_to_float<reduced_t>(src, low, high);
  }
  static void store(reduced_t* dst, const Vec& low, const Vec& high) {
    at::vec::convert_from_float<reduced_t>(low, high).store(dst);
  }
};
template <>
struct VecIO<at::BFloat16, float> : ReducedIO<at::BFloat16> {};
template <>
struct VecIO<at::Half, float> : ReducedIO<at::Half> {};

}  // namespace rmda_fused::cpu
