// Runtime choice between the baseline and AVX2 builds of the solver.
#include <atomic>
#include <stdexcept>

#include "solver_isa.h"

namespace fastvlp {
namespace lsap {
namespace {

enum Isa : int { kAuto = 0, kBaseline = 1, kAvx2 = 2 };

std::atomic<int> requested_isa{kAuto};

bool cpu_has_avx2() {
#if defined(FASTVLP_LSAP_HAVE_AVX2)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
#else
  return false;
#endif
}

int resolved_isa() {
  const int requested = requested_isa.load(std::memory_order_relaxed);
  if (requested == kBaseline) return kBaseline;
  return cpu_has_avx2() ? kAvx2 : kBaseline;
}

}  // namespace

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names{"baseline"};
  if (cpu_has_avx2()) names.push_back("avx2");
  return names;
}

void select_cpu_isa(const std::string& name) {
  if (name == "auto") {
    requested_isa = kAuto;
  } else if (name == "baseline") {
    requested_isa = kBaseline;
  } else if (name == "avx2" && cpu_has_avx2()) {
    requested_isa = kAvx2;
  } else {
    throw std::invalid_argument("cpu isa must be 'auto' or one of the available builds, got '" + name + "'");
  }
}

std::string active_cpu_isa() { return resolved_isa() == kAvx2 ? "avx2" : "baseline"; }

SolveFunction active_solver() {
#if defined(FASTVLP_LSAP_HAVE_AVX2)
  if (resolved_isa() == kAvx2) return &avx2::solve_problem;
#endif
  return &baseline::solve_problem;
}

}  // namespace lsap
}  // namespace fastvlp
