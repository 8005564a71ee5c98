// The per-ISA builds of the single-problem solver and the runtime choice
// between them.
#pragma once

#include <string>
#include <vector>

#include "problem.h"

namespace fastvlp {
namespace lsap {

using SolveFunction = int32_t (*)(const ProblemView& problem, const Workspace& work);

namespace baseline {
int32_t solve_problem(const ProblemView& problem, const Workspace& work);
}

#if defined(FASTVLP_LSAP_HAVE_AVX2)
namespace avx2 {
int32_t solve_problem(const ProblemView& problem, const Workspace& work);
}
#endif

// Names of the builds this CPU can run, best last ("baseline", then "avx2").
std::vector<std::string> available_cpu_isas();

// "auto" (the best available) or one of available_cpu_isas(); throws
// std::invalid_argument otherwise. Meant for tests and benchmarks.
void select_cpu_isa(const std::string& name);

// The build that solve calls use now.
std::string active_cpu_isa();
SolveFunction active_solver();

}  // namespace lsap
}  // namespace fastvlp
