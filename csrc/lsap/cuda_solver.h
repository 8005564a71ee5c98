// Batched linear sum assignment on a CUDA device: one thread block per problem.
//
// Host-side interface only: plain C++ types, no CUDA, torch or pybind11 headers, so that the bindings can
// include it in a translation unit compiled by the host compiler.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastvlp {

// Bytes of device workspace that `lsap_cuda_launch` needs for a batch of `rows x cols` problems. Zero when the
// per-problem solver state (about 25 bytes per column and 24 per row, counted with rows <= cols) fits in
// 48 KiB of shared memory, which covers DETR-sized problems such as 100 x 1000 or 900 x 50; the caller allocates
// the workspace with its own allocator. Returns 0 for arguments that the launch rejects.
size_t lsap_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols);

// Solves `batch` problems with one kernel launch on `stream` (a cudaStream_t passed as void*) on `device`.
// Asynchronous: no host synchronisation and no allocation.
//
// `cost` points to element [0, 0, 0] of a [batch, rows, cols] tensor of `dtype` ("float16", "bfloat16",
// "float32" or "float64"); strides are in elements and may be zero or negative. Problem b is the top-left
// num_rows[b] x num_cols[b] block (`num_rows`/`num_cols` are device pointers, or nullptr for the full extent;
// values are clamped to [0, rows] / [0, cols]). With `maximize` the costs are negated first.
//
// rows and cols must stay below 2^30 - 1 and batch below 2^31.
//
// Results (device memory), with the semantics of scipy.optimize.linear_sum_assignment:
//   out[b * rows + i]  column assigned to row i, or -1 (rows beyond num_rows[b], rows left unassigned when the
//                      problem has more rows than columns, and every row of a problem whose status is not 0);
//   status[b]          0 ok (also for empty problems), 1 the block holds NaN or -inf (after negation),
//                      2 the +inf entries (forbidden pairs) leave no complete assignment.
//
// `workspace` must hold at least lsap_cuda_workspace_bytes(batch, rows, cols) bytes, 16-byte aligned (it may be
// null when that size is 0). Returns 0 (cudaSuccess) or the cudaError_t of the failed call as an int;
// cudaErrorInvalidValue (1) for invalid arguments.
int lsap_cuda_launch(const void* cost, const char* dtype, int64_t batch, int64_t rows, int64_t cols,
                     int64_t stride_batch, int64_t stride_row, int64_t stride_col, const int64_t* num_rows,
                     const int64_t* num_cols, bool maximize, int64_t* out, int32_t* status, void* workspace,
                     size_t workspace_bytes, void* stream, int device);

}  // namespace fastvlp
