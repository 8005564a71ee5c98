// Plain data shared by the batch driver and the per-ISA solver builds.
//
// Everything here is ISA-neutral: the only function has internal linkage, so
// the AVX2 and baseline translation units can both include it without one
// build's machine code leaking into the other through the linker.
#pragma once

#include <cstdint>

namespace fastvlp {
namespace lsap {

enum class ElementType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Per-problem outcome, the values written to the `status` array.
enum Status : int32_t { kOk = 0, kInvalidEntries = 1, kInfeasible = 2 };

// One problem in the wide orientation (rows <= cols). Strides are in
// elements; a tall problem arrives here transposed by swapping strides.
struct ProblemView {
  const void* base;
  ElementType type;
  int64_t rows;
  int64_t cols;
  int64_t stride_row;
  int64_t stride_col;
  bool maximize;
};

// Scratch memory for one problem, owned by the driver and reused across
// problems. Column arrays hold `padded_cols` entries (cols rounded up to the
// vector width) so the scans never need a scalar tail on the work arrays.
struct Workspace {
  int64_t padded_cols;
  double* col_dual;        // v, padded_cols
  double* distance;        // shortest-path costs, padded_cols
  int64_t* predecessor;    // row that last improved each column, padded_cols
  int64_t* col_flags;      // scratch (tie flags of the initial minima), padded_cols
  double* col_key;         // Dijkstra tie-break key (index, + a flag once assigned), padded_cols
  int32_t* row_of_col;     // padded_cols
  double* row_dual;        // u, rows
  int32_t* col_of_row;     // rows (the answer)
  int32_t* row_list;       // free rows, rows
  int32_t* row_count;      // column-reduction match counts, rows
  int32_t* scanned_col;    // columns finalised in one Dijkstra run, rows + 1
  double* scanned_distance;
  double* scanned_dual;
};

constexpr int64_t kVectorWidth = 4;

static constexpr int64_t padded_width(int64_t cols) {
  return (cols + kVectorWidth - 1) / kVectorWidth * kVectorWidth;
}

}  // namespace lsap
}  // namespace fastvlp
