// The solver compiled with AVX2 (this file alone gets -mavx2); it runs only
// after a runtime check of the CPU (see cpu_isa.cpp).
#define FASTVLP_LSAP_ISA avx2
#include "shortest_path_solver.h"
#include "solver_isa.h"

namespace fastvlp {
namespace lsap {
namespace avx2 {

int32_t solve_problem(const ProblemView& problem, const Workspace& work) { return solve_one(problem, work); }

}  // namespace avx2
}  // namespace lsap
}  // namespace fastvlp
