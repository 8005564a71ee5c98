// Batched CPU linear assignment: many independent problems, solved on native
// threads that share an atomic problem counter.
#pragma once

#include <cstdint>

#include "problem.h"

namespace fastvlp {
namespace lsap {

// A batch of cost matrices in one strided buffer. Problem b is the top-left
// num_rows[b] x num_cols[b] block of costs[b] (the full rows x cols when the
// count arrays are null). Strides are in elements and non-negative.
struct BatchRequest {
  const void* costs;
  ElementType type;
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t stride_batch;
  int64_t stride_row;
  int64_t stride_col;
  const int64_t* num_rows;  // [batch] or null
  const int64_t* num_cols;  // [batch] or null
  bool maximize;
  int64_t* assignment;      // [batch, rows]: column of each row, or -1
  int32_t* status;          // [batch]: a Status value
  int64_t num_threads;      // >= 1; min(num_threads, batch) workers
};

int64_t element_size(ElementType type);

// Solves every problem of the batch. The request must already be validated
// (counts within bounds, buffers large enough); problem-level failures are
// reported through `status`, never thrown.
void solve_batch(const BatchRequest& request);

}  // namespace lsap
}  // namespace fastvlp
