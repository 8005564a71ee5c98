// Batch driver: per-problem orientation, reusable per-thread workspaces, and
// the split of a batch over the worker pool.
#include "batch_solver.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <vector>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTVLP_HAVE_MXCSR 1
#endif

#include "solver_isa.h"
#include "worker_pool.h"

namespace fastvlp {
namespace lsap {
namespace {

// Grows only, so a thread that solves many problems allocates once.
class WorkspaceBuffers {
 public:
  Workspace view(int64_t rows, int64_t cols) {
    const int64_t padded = padded_width(cols);
    grow(doubles_, 3 * padded + 3 * (rows + 1));
    grow(int64s_, 2 * padded);
    grow(int32s_, padded + 4 * (rows + 1));
    Workspace w;
    w.padded_cols = padded;
    double* d = doubles_.data();
    w.col_dual = d;
    w.distance = d + padded;
    w.col_key = d + 2 * padded;
    w.row_dual = d + 3 * padded;
    w.scanned_distance = w.row_dual + (rows + 1);
    w.scanned_dual = w.scanned_distance + (rows + 1);
    w.predecessor = int64s_.data();
    w.col_flags = int64s_.data() + padded;
    int32_t* i = int32s_.data();
    w.row_of_col = i;
    w.col_of_row = i + padded;
    w.row_list = w.col_of_row + (rows + 1);
    w.row_count = w.row_list + (rows + 1);
    w.scanned_col = w.row_count + (rows + 1);
    return w;
  }

 private:
  template <class V>
  static void grow(V& v, int64_t size) {
    if (int64_t(v.size()) < size) v.resize(size_t(size));
  }

  std::vector<double> doubles_;
  std::vector<int64_t> int64s_;
  std::vector<int32_t> int32s_;
};

// The solver's arithmetic must not depend on the caller's flush-to-zero or
// rounding settings, so each worker runs with the default MXCSR.
class DefaultFloatingPointMode {
 public:
#if defined(FASTVLP_HAVE_MXCSR)
  DefaultFloatingPointMode() : saved_(_mm_getcsr()) { _mm_setcsr(0x1f80); }
  ~DefaultFloatingPointMode() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

void solve_problem(const BatchRequest& r, int64_t b, SolveFunction solve, WorkspaceBuffers& buffers) {
  const int64_t n = r.num_rows ? r.num_rows[b] : r.rows;
  const int64_t m = r.num_cols ? r.num_cols[b] : r.cols;
  int64_t* out = r.assignment + b * r.rows;
  std::fill(out, out + r.rows, int64_t(-1));
  r.status[b] = kOk;
  if (n == 0 || m == 0) return;

  // Solve in the wide orientation; a tall problem is its transpose, which
  // only swaps the strides.
  const bool transposed = n > m;
  ProblemView p;
  p.base = static_cast<const char*>(r.costs) + b * r.stride_batch * element_size(r.type);
  p.type = r.type;
  p.rows = transposed ? m : n;
  p.cols = transposed ? n : m;
  p.stride_row = transposed ? r.stride_col : r.stride_row;
  p.stride_col = transposed ? r.stride_row : r.stride_col;
  p.maximize = r.maximize;

  const Workspace w = buffers.view(p.rows, p.cols);
  const int32_t status = solve(p, w);
  r.status[b] = status;
  if (status != kOk) return;
  if (transposed) {
    for (int64_t j = 0; j < p.rows; ++j) out[w.col_of_row[j]] = j;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = w.col_of_row[i];
  }
}

WorkspaceBuffers& thread_buffers() {
  thread_local WorkspaceBuffers buffers;
  return buffers;
}

// Shared by the threads of one batch; problems are handed out one at a time
// so uneven sizes still balance.
struct BatchJob {
  const BatchRequest* request;
  SolveFunction solve;
  std::atomic<int64_t> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
};

void run_batch_job(void* context) {
  BatchJob& job = *static_cast<BatchJob*>(context);
  const int64_t batch = job.request->batch;
  try {
    DefaultFloatingPointMode fp_mode;
    WorkspaceBuffers& buffers = thread_buffers();
    for (int64_t b = job.next.fetch_add(1); b < batch; b = job.next.fetch_add(1)) {
      solve_problem(*job.request, b, job.solve, buffers);
    }
  } catch (...) {  // only allocation failures can land here
    job.next.store(batch);
    std::lock_guard<std::mutex> lock(job.failure_mutex);
    if (!job.failure) job.failure = std::current_exception();
  }
}

}  // namespace

int64_t element_size(ElementType type) {
  switch (type) {
    case ElementType::kFloat16:
    case ElementType::kBFloat16:
      return 2;
    case ElementType::kFloat32:
      return 4;
    case ElementType::kFloat64:
      return 8;
  }
  return 0;
}

void solve_batch(const BatchRequest& request) {
  if (request.batch <= 0) return;
  BatchJob job;
  job.request = &request;
  job.solve = active_solver();
  const int64_t workers = std::max<int64_t>(1, std::min(request.num_threads, request.batch));
  // One worker runs inline on the calling thread: no thread hand-off at all.
  run_parallel(run_batch_job, &job, workers - 1);
  if (job.failure) std::rethrow_exception(job.failure);
}

}  // namespace lsap
}  // namespace fastvlp
