// Exact rectangular linear assignment (rows <= cols) by shortest augmenting
// paths, the method of Crouse (2016) that scipy uses, with float64 duals.
//
// Stages:
//   1. Initial duals and a partial matching.
//      square: Jonker-Volgenant column reduction and reduction transfer;
//      wide:   row reduction (v = 0, each row takes its cheapest column).
//      The wide case must keep v[j] = 0 on unassigned columns (they stay
//      interchangeable with the implicit dummy rows), which column reduction
//      would break; row reduction keeps it.
//   2. Augmenting row reduction (Jonker-Volgenant): a free row takes its
//      cheapest column, lowering that column's dual by the gap to the row's
//      second-cheapest, and displaces the previous owner. It only lowers the
//      dual of a column that ends up assigned, so the wide invariant holds.
//   3. For every row still free, Dijkstra over the columns (all columns are
//      scanned with vector code; finalised ones are masked by v = -inf) and
//      an augmentation along the shortest path, then the dual update.
// Invariant throughout: c[i][j] - u[i] - v[j] >= 0, with equality on matched
// pairs, which makes the final matching optimal.
#pragma once

#include "row_scans.h"

namespace fastvlp {
namespace lsap {
namespace FASTVLP_LSAP_ISA {

template <class T, bool kContiguous, bool kNegate>
class ShortestPathSolver {
 public:
  using Reader = RowReader<T, kContiguous, kNegate>;

  ShortestPathSolver(const ProblemView& problem, const Workspace& work)
      : base_(static_cast<const T*>(problem.base)),
        rows_(problem.rows),
        cols_(problem.cols),
        stride_row_(problem.stride_row),
        stride_col_(problem.stride_col),
        w_(work) {}

  int32_t solve() {
    for (int64_t j = 0; j < w_.padded_cols; ++j) {
      w_.row_of_col[j] = -1;
      w_.col_dual[j] = j < cols_ ? 0.0 : -kInf;  // padding columns read as forbidden
      w_.col_key[j] = double(j) + (j < cols_ ? 0.0 : kAssignedKey);
    }
    for (int64_t i = 0; i < rows_; ++i) {
      w_.col_of_row[i] = -1;
      w_.row_dual[i] = 0.0;
    }
    int32_t status = rows_ == cols_ ? column_reduction() : row_reduction();
    if (status != kOk) return status;
    status = augmenting_row_reduction();
    if (status != kOk) return status;
    for (int64_t k = 0; k < free_count_; ++k) {
      status = augment(w_.row_list[k]);
      if (status != kOk) return status;
    }
    return kOk;
  }

 private:
  Reader row(int64_t i) const { return Reader{base_ + i * stride_row_, stride_col_}; }

  // Columns never become free again: the matching only grows or swaps rows.
  void assign(int64_t i, int64_t j) {
    w_.col_of_row[i] = int32_t(j);
    w_.row_of_col[j] = int32_t(i);
    w_.col_key[j] = double(j) + kAssignedKey;
  }

  // First unassigned column after `after` whose cost in this row equals `value`.
  int64_t free_column_with_cost(const Reader& r, int64_t after, double value) const {
    for (int64_t j = after + 1; j < cols_; ++j) {
      if (w_.row_of_col[j] < 0 && r.at(j) == value) return j;
    }
    return -1;
  }

  RowReader<T, true, kNegate> contiguous_line(const T* start) const { return {start, 1}; }

  // Columns are the contiguous direction (a transposed view): the passes over
  // the whole matrix then walk columns instead of strided rows.
  bool columns_contiguous() const { return !kContiguous && stride_row_ == 1; }

  // For every row i: minimum[i] = min_j c[i][j], its first column and a tie
  // flag. Returns false if the matrix holds an invalid entry.
  bool row_minima(double* minimum, int64_t* first_col, int64_t* repeated) const {
    if (columns_contiguous()) {
      for (int64_t i = 0; i < padded_width(rows_); ++i) {
        minimum[i] = kInf;
        first_col[i] = 0;
        repeated[i] = 0;
      }
      bool valid = true;
      for (int64_t j = 0; j < cols_; ++j) {
        valid &= fold_line_minimum(contiguous_line(base_ + j * stride_col_), rows_, j, minimum, first_col, repeated);
      }
      return valid;
    }
    for (int64_t i = 0; i < rows_; ++i) {
      bool invalid = false;
      const MinResult best = row_minimum(row(i), cols_, &invalid);
      if (invalid) return false;
      minimum[i] = best.value;
      first_col[i] = best.index;
      repeated[i] = best.tie;
    }
    return true;
  }

  // For every column j: minimum[j] = min_i c[i][j], its first row and a tie
  // flag. Returns false if the matrix holds an invalid entry.
  bool column_minima(double* minimum, int64_t* first_row, int64_t* repeated) const {
    if (columns_contiguous()) {
      for (int64_t j = 0; j < cols_; ++j) {
        bool invalid = false;
        const MinResult best = row_minimum(contiguous_line(base_ + j * stride_col_), rows_, &invalid);
        if (invalid) return false;
        minimum[j] = best.value;
        first_row[j] = best.index;
        repeated[j] = best.tie;
      }
      return true;
    }
    for (int64_t j = 0; j < w_.padded_cols; ++j) {
      minimum[j] = kInf;
      first_row[j] = 0;
      repeated[j] = 0;
    }
    bool valid = true;
    for (int64_t i = 0; i < rows_; ++i) valid &= fold_line_minimum(row(i), cols_, i, minimum, first_row, repeated);
    return valid;
  }

  // Wide start: v = 0, u[i] = min_j c[i][j]; a row keeps its cheapest column
  // unless an earlier row took it (then the first free tied column, if any).
  int32_t row_reduction() {
    double* minimum = w_.distance;
    int64_t* first_col = w_.predecessor;
    int64_t* repeated = w_.col_flags;
    if (!row_minima(minimum, first_col, repeated)) return kInvalidEntries;
    bool infeasible = false;
    free_count_ = 0;
    for (int64_t i = 0; i < rows_; ++i) {
      const double value = minimum[i];
      if (!(value < kInf)) {  // every pair of this row is forbidden
        infeasible = true;
        continue;
      }
      w_.row_dual[i] = value;
      int64_t j = first_col[i];
      if (w_.row_of_col[j] >= 0 && repeated[i]) {
        const int64_t tied = free_column_with_cost(row(i), j, value);
        if (tied >= 0) j = tied;
      }
      if (w_.row_of_col[j] < 0) {
        assign(i, j);
      } else {
        w_.row_list[free_count_++] = int32_t(i);
      }
    }
    return infeasible ? kInfeasible : kOk;
  }

  // Square start (Jonker-Volgenant): v[j] = min_i c[i][j]; each column goes to
  // its cheapest row if that row is still free; rows matched exactly once
  // then transfer their slack to the column dual.
  int32_t column_reduction() {
    double* minimum = w_.col_dual;
    int64_t* first_row = w_.predecessor;
    int64_t* repeated = w_.col_flags;
    if (!column_minima(minimum, first_row, repeated)) return kInvalidEntries;
    for (int64_t j = cols_; j < w_.padded_cols; ++j) minimum[j] = -kInf;
    for (int64_t j = 0; j < cols_; ++j) {
      if (!(minimum[j] < kInf)) return kInfeasible;  // a column nobody may take
    }
    for (int64_t i = 0; i < rows_; ++i) w_.row_count[i] = 0;
    for (int64_t j = 0; j < cols_; ++j) {
      int64_t i = first_row[j];
      if (w_.col_of_row[i] >= 0 && repeated[j]) {
        for (int64_t k = i + 1; k < rows_; ++k) {
          if (w_.col_of_row[k] < 0 && row(k).at(j) == minimum[j]) {
            i = k;
            break;
          }
        }
      }
      ++w_.row_count[i];
      if (w_.col_of_row[i] < 0) assign(i, j);
    }
    free_count_ = 0;
    for (int64_t i = 0; i < rows_; ++i) {
      if (w_.col_of_row[i] < 0) {
        w_.row_list[free_count_++] = int32_t(i);
      } else if (w_.row_count[i] == 1) {
        // Row i's own column has reduced cost 0, the row minimum, so the second
        // smallest is the cheapest alternative; moving it into u[i] keeps
        // every reduced cost of the row non-negative.
        const TwoMinResult t = two_smallest(row(i), cols_, w_.col_dual);
        if (t.second < kInf) {
          w_.col_dual[w_.col_of_row[i]] -= t.second;
          w_.row_dual[i] = t.second;
        }
      }
    }
    return kOk;
  }

  // Up to two passes over the free rows (as in Jonker-Volgenant) under a cap
  // on the total steps; the rows left over go to the shortest-path stage.
  // On (near-)square problems the last free rows displace each other in long
  // chains while the matching fills up, and shortest paths finish them
  // sooner, so the cap is tight there (about one step per row, measured on
  // random costs); wide problems have free columns to spare and rarely
  // reach it.
  int32_t augmenting_row_reduction() {
    int64_t steps_left = cols_ < 2 * rows_ ? rows_ : 8 * rows_;
    for (int pass = 0; pass < 2 && free_count_ > 0; ++pass) {
      const int64_t pending = free_count_;
      int64_t next = 0;
      free_count_ = 0;
      while (next < pending) {
        if (--steps_left < 0) {  // keep the unprocessed rows for stage 3
          while (next < pending) w_.row_list[free_count_++] = w_.row_list[next++];
          break;
        }
        const int64_t i = w_.row_list[next++];
        const Reader r = row(i);
        const TwoMinResult t = two_smallest(r, cols_, w_.col_dual);
        if (!(t.first < kInf)) return kInfeasible;
        if (!(t.second < kInf)) {  // a single admissible column: leave it to stage 3
          w_.row_list[free_count_++] = int32_t(i);
          continue;
        }
        int64_t j = t.index;
        int64_t previous = w_.row_of_col[j];
        const bool strict = t.first < t.second;
        if (strict) {
          w_.col_dual[j] -= t.second - t.first;
          w_.row_dual[i] = t.second;
        } else {
          if (previous >= 0) {
            const int64_t tied = free_reduced_column(r, j, t.first);
            if (tied >= 0) {
              j = tied;
              previous = -1;
            }
          }
          w_.row_dual[i] = t.first;
        }
        assign(i, j);
        if (previous >= 0) {
          w_.col_of_row[previous] = -1;
          if (strict) {
            w_.row_list[--next] = int32_t(previous);  // the displaced row goes next
          } else {
            w_.row_list[free_count_++] = int32_t(previous);
          }
        }
      }
    }
    return kOk;
  }

  // First unassigned column after `after` whose reduced cost equals `value`.
  int64_t free_reduced_column(const Reader& r, int64_t after, double value) const {
    for (int64_t j = after + 1; j < cols_; ++j) {
      if (w_.row_of_col[j] < 0 && r.at(j) - w_.col_dual[j] == value) return j;
    }
    return -1;
  }

  // Shortest augmenting path from the free row `start` (Dijkstra over the
  // columns with reduced costs), then the dual update and the augmentation.
  int32_t augment(int64_t start) {
    double* dual = w_.col_dual;
    double* distance = w_.distance;
    int64_t scanned = 0;
    KeyedMin best = relax_row<true>(row(start), cols_, -w_.row_dual[start], start, dual, w_.col_key, distance,
                                    w_.predecessor);
    int64_t sink;
    for (;;) {
      if (!(best.value < kInf)) return kInfeasible;
      const bool free_column = best.key < kAssignedKey;
      const int64_t j = int64_t(free_column ? best.key : best.key - kAssignedKey);
      if (free_column) {  // the path ends here
        sink = j;
        break;
      }
      // Finalise column j: remember its distance and dual, then mask it out.
      w_.scanned_col[scanned] = int32_t(j);
      w_.scanned_distance[scanned] = best.value;
      w_.scanned_dual[scanned] = dual[j];
      ++scanned;
      distance[j] = kInf;
      dual[j] = -kInf;
      const int64_t i = w_.row_of_col[j];
      best = relax_row<false>(row(i), cols_, best.value - w_.row_dual[i], i, dual, w_.col_key, distance,
                              w_.predecessor);
    }
    const double shortest = best.value;
    w_.row_dual[start] += shortest;
    for (int64_t k = 0; k < scanned; ++k) {
      const int64_t j = w_.scanned_col[k];
      const double delta = shortest - w_.scanned_distance[k];
      w_.row_dual[w_.row_of_col[j]] += delta;
      dual[j] = w_.scanned_dual[k] - delta;
    }
    int64_t j = sink;
    for (;;) {
      const int64_t i = w_.predecessor[j];
      const int64_t previous = w_.col_of_row[i];
      assign(i, j);
      if (i == start) break;
      j = previous;
    }
    return kOk;
  }

  const T* base_;
  int64_t rows_, cols_, stride_row_, stride_col_;
  Workspace w_;
  int64_t free_count_ = 0;
};

template <class T, bool kContiguous>
static int32_t solve_with_layout(const ProblemView& problem, const Workspace& work) {
  return problem.maximize ? ShortestPathSolver<T, kContiguous, true>(problem, work).solve()
                          : ShortestPathSolver<T, kContiguous, false>(problem, work).solve();
}

template <class T>
static int32_t solve_typed(const ProblemView& problem, const Workspace& work) {
  return problem.stride_col == 1 ? solve_with_layout<T, true>(problem, work)
                                 : solve_with_layout<T, false>(problem, work);
}

// Entry point of one ISA build: dispatch on element type, layout and sign.
static inline int32_t solve_one(const ProblemView& problem, const Workspace& work) {
  switch (problem.type) {
    case ElementType::kFloat32:
      return solve_typed<float>(problem, work);
    case ElementType::kFloat64:
      return solve_typed<double>(problem, work);
    case ElementType::kFloat16:
      return solve_typed<Float16>(problem, work);
    case ElementType::kBFloat16:
      return solve_typed<BFloat16>(problem, work);
  }
  return kInvalidEntries;
}

}  // namespace FASTVLP_LSAP_ISA
}  // namespace lsap
}  // namespace fastvlp
