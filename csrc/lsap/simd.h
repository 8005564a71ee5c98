// float64 vectors and element loaders for the solver scans.
//
// Written with GCC/Clang vector extensions so one source compiles for each
// ISA: four lanes (256-bit) in the AVX2 build, two lanes (128-bit: SSE2 on
// x86-64, NEON on Arm) in the baseline build. The width must match the
// hardware registers; wider generic vectors get split into scalar code.
//
// Include only from a solver_<isa>.cpp that defines FASTVLP_LSAP_ISA: every
// name lives in that per-ISA namespace (or has internal linkage), so the
// linker can never hand AVX2 code to the baseline path.
#pragma once

#ifndef FASTVLP_LSAP_ISA
#error "simd.h is included from a solver_<isa>.cpp that defines FASTVLP_LSAP_ISA"
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "problem.h"

namespace fastvlp {
namespace lsap {
namespace FASTVLP_LSAP_ISA {

#if defined(__AVX2__)
constexpr int kLanes = 4;
#else
constexpr int kLanes = 2;
#endif
static_assert(kVectorWidth % kLanes == 0, "work arrays are padded to a multiple of the lane count");

typedef double VecD __attribute__((vector_size(8 * kLanes)));
typedef int64_t VecI __attribute__((vector_size(8 * kLanes)));
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI32 __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VecU32 __attribute__((vector_size(4 * kLanes)));
typedef uint16_t VecU16 __attribute__((vector_size(2 * kLanes)));

constexpr double kInf = __builtin_inf();

static inline VecD splat(double x) {
  VecD v;
  for (int k = 0; k < kLanes; ++k) v[k] = x;
  return v;
}
static inline VecI splat_int(int64_t x) {
  VecI v;
  for (int k = 0; k < kLanes; ++k) v[k] = x;
  return v;
}
static inline VecI lane_offsets() {
  VecI v;
  for (int k = 0; k < kLanes; ++k) v[k] = k;
  return v;
}
static inline bool all_lanes(VecI mask) {
  for (int k = 0; k < kLanes; ++k) {
    if (mask[k] == 0) return false;
  }
  return true;
}

template <class V, class S>
static inline V load_vector(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline VecD load(const double* p) { return load_vector<VecD>(p); }
static inline VecI load(const int64_t* p) { return load_vector<VecI>(p); }
static inline void store(double* p, VecD v) { std::memcpy(p, &v, sizeof v); }
static inline void store(int64_t* p, VecI v) { std::memcpy(p, &v, sizeof v); }

// Element types carried as raw 16-bit patterns.
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

static inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE half to float by bit manipulation. Subnormal halves go through an
// exact integer-to-float product, so the result never depends on the
// denormals-are-zero mode of the calling thread.
static inline double half_to_double(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  const uint32_t magnitude = uint32_t(h) & 0x7fffu;
  if (magnitude < 0x0400u) {
    const double value = double(magnitude) * 5.9604644775390625e-08;  // 2^-24
    return sign ? -value : value;
  }
  uint32_t bits = (magnitude << 13) + (112u << 23);  // rebias the exponent 15 -> 127
  if (magnitude >= 0x7c00u) bits += 112u << 23;      // inf/NaN: exponent all ones
  return double(float_from_bits(bits | sign));
}

// The same conversion, one vector of halves at a time.
static inline VecD half_block_to_double(const Float16* p) {
  const VecU32 h = __builtin_convertvector(load_vector<VecU16>(p), VecU32);
  const VecU32 sign = (h & 0x8000u) << 16;
  const VecU32 magnitude = h & 0x7fffu;
  VecU32 bits = (magnitude << 13) + (112u << 23);
  bits += (VecU32)(magnitude >= 0x7c00u) & (112u << 23);
  const VecF sub = __builtin_convertvector((VecI32)magnitude, VecF) * 5.9604644775390625e-08f;
  const VecU32 sub_bits = load_vector<VecU32>(&sub);
  const VecU32 is_sub = (VecU32)(magnitude < 0x0400u);
  const VecU32 out = ((sub_bits & is_sub) | (bits & ~is_sub)) | sign;
  return __builtin_convertvector(load_vector<VecF>(&out), VecD);
}

// Loads of one stored element (`one`) or kLanes consecutive ones (`block`),
// widened to float64.
template <class T>
struct Element;

template <>
struct Element<float> {
  static double one(const float* p) { return double(*p); }
  static VecD block(const float* p) {
#if defined(__AVX2__)
    return (VecD)_mm256_cvtps_pd(_mm_loadu_ps(p));
#else
    return __builtin_convertvector(load_vector<VecF>(p), VecD);
#endif
  }
};

template <>
struct Element<double> {
  static double one(const double* p) { return *p; }
  static VecD block(const double* p) { return load(p); }
};

template <>
struct Element<BFloat16> {
  static double one(const BFloat16* p) { return double(float_from_bits(uint32_t(p->bits) << 16)); }
  static VecD block(const BFloat16* p) {
    const VecU32 bits = __builtin_convertvector(load_vector<VecU16>(p), VecU32) << 16;
    return __builtin_convertvector(load_vector<VecF>(&bits), VecD);
  }
};

template <>
struct Element<Float16> {
  static double one(const Float16* p) { return half_to_double(p->bits); }
  static VecD block(const Float16* p) { return half_block_to_double(p); }
};

// One row of the (possibly transposed, possibly negated) cost matrix, read in
// its stored type and widened to float64 on the fly. Negation is a template
// parameter so that minimisation pays nothing for it.
template <class T, bool kContiguous, bool kNegate>
struct RowReader {
  const T* row;
  int64_t stride;  // between consecutive columns, in elements

  static double sign(double x) { return kNegate ? -x : x; }
  static VecD sign(VecD x) { return kNegate ? -x : x; }

  double at(int64_t j) const { return sign(Element<T>::one(kContiguous ? row + j : row + j * stride)); }

  VecD block(int64_t j) const {
    if (kContiguous) return sign(Element<T>::block(row + j));
    VecD x;
    for (int k = 0; k < kLanes; ++k) x[k] = Element<T>::one(row + (j + k) * stride);
    return sign(x);
  }

  // The last partial block: lanes past the row end read as +inf (a forbidden
  // pair), which no scan ever selects.
  VecD tail(int64_t j, int64_t count) const {
    VecD x = splat(kInf);
    for (int64_t k = 0; k < count; ++k) x[k] = at(j + k);
    return x;
  }
};

// Calls body(j, costs, positions, lane_set) for every kLanes-column block of
// a row, where positions = {j, j+1, ...}, and lane_set alternates 0, 1 so
// that scans carrying a running minimum can keep two independent
// accumulators (halving the loop-carried latency).
template <class Reader, class Body>
__attribute__((always_inline)) static inline void for_each_block(const Reader& reader, int64_t cols, Body&& body) {
  VecI positions = lane_offsets();
  const VecI step = splat_int(kLanes);
  int64_t j = 0;
  for (; j + 2 * kLanes <= cols; j += 2 * kLanes) {
    body(j, reader.block(j), positions, 0);
    positions += step;
    body(j + kLanes, reader.block(j + kLanes), positions, 1);
    positions += step;
  }
  if (j + kLanes <= cols) {
    body(j, reader.block(j), positions, 0);
    positions += step;
    j += kLanes;
  }
  if (j < cols) body(j, reader.tail(j, cols - j), positions, 1);
}

}  // namespace FASTVLP_LSAP_ISA
}  // namespace lsap
}  // namespace fastvlp
