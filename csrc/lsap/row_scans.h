// The vectorised passes of the solver: every pass walks one cost row (or one
// column, when that is the contiguous direction) in blocks of kLanes,
// widening the stored element type to float64.
//
// Ties matter for two reasons: a constant matrix must give the identity (as
// scipy does), and preferring an unassigned column among equal minima ends a
// shortest-path search early. The initial scans report the first index of the
// minimum and whether another entry shares it (raw costs rarely tie, so the
// caller's scalar look-up for an unassigned tied column is rare). The
// Dijkstra scan, where ties are common (rows are tight on two columns after
// the reductions), instead compares per-column keys: the column index, plus
// kAssignedKey once the column is assigned, so the smallest key among equal
// distances is the first free column if there is one.
#pragma once

#include "simd.h"

// The scans' accumulator structs must live in registers, so their small
// helpers are always inlined.
#define FASTVLP_INLINE __attribute__((always_inline)) inline

namespace fastvlp {
namespace lsap {
namespace FASTVLP_LSAP_ISA {

struct MinResult {
  double value;   // the minimum (+inf when every entry is +inf)
  int64_t index;  // its first position
  bool tie;       // some other position holds the same value
};

// Keys are whole numbers held in doubles (exact below 2^53), so the scan
// compares them with the same instructions as the distances.
constexpr double kAssignedKey = 1099511627776.0;  // 2^40 > any column index

// Per-lane running minimum, its first index and a "seen twice" flag.
struct LaneMin {
  VecD value = splat(kInf);
  VecI index = splat_int(0);
  VecI repeated = splat_int(0);

  FASTVLP_INLINE void update(VecD x, VecI positions) {
    const VecI less = x < value;
    const VecI equal = x == value;
    repeated = (repeated | equal) & ~less;
    index = less ? positions : index;
    value = less ? x : value;
  }
};

// Combines the lanes of two accumulators: the smallest value, its lowest
// index, and whether the value occurs more than once.
static FASTVLP_INLINE MinResult reduce(const LaneMin& a, const LaneMin& b) {
  MinResult r{kInf, 0, false};
  bool found = false;
  const LaneMin* sets[2] = {&a, &b};
  for (const LaneMin* set : sets) {
    for (int k = 0; k < kLanes; ++k) {
      const double v = set->value[k];
      if (!found || v < r.value) {
        r = MinResult{v, set->index[k], set->repeated[k] != 0};
        found = true;
      } else if (v == r.value) {
        r.tie = true;
        if (set->index[k] < r.index) r.index = set->index[k];
      }
    }
  }
  return r;
}

// False if any lane saw an entry that makes the problem invalid: NaN, or
// -inf (after the maximisation sign flip). Comparisons with NaN are false.
static inline VecI valid_entries(VecD x) { return x > splat(-kInf); }

// Minimum of a raw row, also checking every entry for validity.
template <class Reader>
static inline MinResult row_minimum(const Reader& row, int64_t cols, bool* invalid) {
  LaneMin lanes[2];
  VecI valid = splat_int(-1);
  for_each_block(row, cols, [&](int64_t, VecD x, VecI positions, int set) {
    valid &= valid_entries(x);
    lanes[set].update(x, positions);
  });
  *invalid = !all_lanes(valid);
  return reduce(lanes[0], lanes[1]);
}

// Element-wise minima across lines (rows of the matrix, or columns when those
// are contiguous), folded in one line at a time: minimum[k], the first line
// holding it (first_line[k]) and a tie flag. Returns false if the line holds
// an invalid entry.
template <class Reader>
static inline bool fold_line_minimum(const Reader& line, int64_t length, int64_t line_index, double* minimum,
                                     int64_t* first_line, int64_t* repeated) {
  VecI valid = splat_int(-1);
  const VecI line_vec = splat_int(line_index);
  for_each_block(line, length, [&](int64_t k, VecD x, VecI, int) {
    valid &= valid_entries(x);
    const VecD current = load(minimum + k);
    const VecI less = x < current;
    const VecI equal = x == current;
    store(repeated + k, (load(repeated + k) | equal) & ~less);
    store(first_line + k, less ? line_vec : load(first_line + k));
    store(minimum + k, less ? x : current);
  });
  return all_lanes(valid);
}

struct TwoMinResult {
  double first;    // smallest reduced cost
  int64_t index;   // its first column
  double second;   // second smallest, counting repeats (== first on a tie)
};

// Smallest and second smallest reduced cost c[i][j] - v[j] of a row.
template <class Reader>
static inline TwoMinResult two_smallest(const Reader& row, int64_t cols, const double* col_dual) {
  VecD first[2] = {splat(kInf), splat(kInf)};
  VecD second[2] = {splat(kInf), splat(kInf)};
  VecI index[2] = {splat_int(0), splat_int(0)};
  for_each_block(row, cols, [&](int64_t j, VecD x, VecI positions, int s) {
    const VecD h = x - load(col_dual + j);
    const VecI less = h < first[s];
    const VecD larger = less ? first[s] : h;
    second[s] = larger < second[s] ? larger : second[s];
    index[s] = less ? positions : index[s];
    first[s] = less ? h : first[s];
  });
  int best_set = 0, best_lane = 0;
  for (int s = 0; s < 2; ++s) {
    for (int k = 0; k < kLanes; ++k) {
      const double v = first[s][k], b = first[best_set][best_lane];
      if (v < b || (v == b && index[s][k] < index[best_set][best_lane])) {
        best_set = s;
        best_lane = k;
      }
    }
  }
  TwoMinResult r{first[best_set][best_lane], index[best_set][best_lane], kInf};
  for (int s = 0; s < 2; ++s) {
    for (int k = 0; k < kLanes; ++k) {
      if (second[s][k] < r.second) r.second = second[s][k];
      if ((s != best_set || k != best_lane) && first[s][k] < r.second) r.second = first[s][k];
    }
  }
  return r;
}

struct KeyedMin {
  double value;  // the minimum distance (+inf when nothing is reachable)
  double key;    // the smallest key among the columns at that distance
};

// One Dijkstra relaxation: for every column, candidate = base + c[i][j] - v[j];
// keep the smaller of it and distance[j] (recording row i as predecessor), and
// return the minimum distance and the smallest column key at it. Finalised
// columns carry v = -inf and distance = +inf, so they neither change nor win.
// kFirst writes the candidates unconditionally (the search's start row).
template <bool kFirst, class Reader>
static inline KeyedMin relax_row(const Reader& row, int64_t cols, double base, int64_t row_index,
                                 const double* col_dual, const double* col_key, double* distance,
                                 int64_t* predecessor) {
  VecD best[2] = {splat(kInf), splat(kInf)};
  VecD best_key[2] = {splat(kInf), splat(kInf)};
  const VecD base_vec = splat(base);
  const VecI row_vec = splat_int(row_index);
  for_each_block(row, cols, [&](int64_t j, VecD x, VecI, int s) {
    const VecD candidate = (x - load(col_dual + j)) + base_vec;
    VecD dist;
    if (kFirst) {
      dist = candidate;
      store(predecessor + j, row_vec);
    } else {
      dist = load(distance + j);
      const VecI less = candidate < dist;
      dist = less ? candidate : dist;
      store(predecessor + j, less ? row_vec : load(predecessor + j));
    }
    store(distance + j, dist);
    const VecD key = load(col_key + j);
    const VecI better = (dist < best[s]) | ((dist == best[s]) & (key < best_key[s]));
    best_key[s] = better ? key : best_key[s];
    best[s] = better ? dist : best[s];
  });
  KeyedMin r{kInf, kInf};
  for (int s = 0; s < 2; ++s) {
    for (int k = 0; k < kLanes; ++k) {
      if (best[s][k] < r.value || (best[s][k] == r.value && best_key[s][k] < r.key)) {
        r = KeyedMin{best[s][k], best_key[s][k]};
      }
    }
  }
  return r;
}

}  // namespace FASTVLP_LSAP_ISA
}  // namespace lsap
}  // namespace fastvlp
