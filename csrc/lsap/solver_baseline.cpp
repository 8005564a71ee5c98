// The solver compiled for the x86-64 (SSE2) baseline or the target's default.
#define FASTVLP_LSAP_ISA baseline
#include "shortest_path_solver.h"
#include "solver_isa.h"

namespace fastvlp {
namespace lsap {
namespace baseline {

int32_t solve_problem(const ProblemView& problem, const Workspace& work) { return solve_one(problem, work); }

}  // namespace baseline
}  // namespace lsap
}  // namespace fastvlp
