// Batched rectangular linear sum assignment on a CUDA device, one thread block per problem.
//
// The algorithm is the shortest augmenting path method of Crouse ("On implementing 2D rectangular assignment
// algorithms", IEEE TAES 2016), the one scipy.optimize.linear_sum_assignment implements, with the column loop
// of each Dijkstra step spread over the threads of the block. A problem is solved in its wide orientation
// (rows <= cols); tall problems are read through swapped strides. Thread t owns the columns t, t + blockDim,
// ...: it alone touches their duals v, path costs and scanned flags, so those need no barrier. Duals are kept
// in float64 whatever the input dtype (half, bfloat16 and float32 widen to float64 exactly).
//
// Phases of one block (the barrier that ends each is noted):
//   A  outputs to -1, column state reset.                                                      __syncthreads
//   B  warps over rows: NaN / -inf scan, u = row minimum, each row claims its argmin column.    __syncthreads_or
//   C  the lowest claiming row keeps each claimed column: a tight pair with v = 0 (a valid start for the
//      rectangular method: reduced costs >= 0 and v = 0 on every free column).                 __syncthreads
//   D  for each row still unassigned: Dijkstra over the columns, one barrier per step (inside the block-wide
//      argmin); then the owners update v while thread 0 updates u and augments along the path. __syncthreads
//   E  outputs.

#include "cuda_solver.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>

namespace fastvlp {
namespace {

constexpr int32_t kStatusOk = 0;
constexpr int32_t kStatusInvalidEntries = 1;
constexpr int32_t kStatusInfeasible = 2;

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kRowsPerPass = 4;  // rows per warp and pass in the row-minimum phase

// Argmin keys are column indices with this bit set on columns that are already assigned, so that on equal
// path costs a free column wins and ends the search early. Extents therefore stay below it.
constexpr int32_t kAssignedBit = 1 << 30;
constexpr int32_t kNoColumn = INT_MAX;  // argmin key of a thread without candidates; also "unclaimed"
constexpr int64_t kMaxExtent = kAssignedBit - 2;  // so that every key of a real column is below kNoColumn

constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;  // the default per-block limit: no opt-in attribute
constexpr size_t kStateAlignment = 16;
constexpr size_t kWorkspaceAlignment = 256;

constexpr double kInf = __builtin_huge_val();

// Cross-warp argmin exchange. Double-buffered: Dijkstra step s writes buffer s & 1 while slow threads may still
// read buffer (s - 1) & 1, and buffer s & 1 was last read before the barrier of step s - 1. So one barrier per
// step suffices.
struct ArgminScratch {
  double value[2][kMaxWarps];
  int32_t key[2][kMaxWarps];
};

// Byte offsets of the per-problem solver state, for at most `wide_rows` rows and `wide_cols` columns.
struct StateLayout {
  size_t v;           // double[cols]   column duals
  size_t path_cost;   // double[cols]   shortest path cost to each column in the current search
  size_t u;           // double[rows]   row duals
  size_t visit_cost;  // double[rows]   path cost of the column through which the i-th visited row was reached
  size_t path;        // int32[cols]    row from which each column was reached
  size_t row4col;     // int32[cols]    row assigned to each column, or -1
  size_t col4row;     // int32[rows]    column assigned to each row, or -1
  size_t visit_row;   // int32[rows]    rows visited by the current search, in order
  size_t scanned;     // uint8[cols]    column already settled by the current search
  size_t bytes;
};

struct SolverParams {
  const void* cost;
  int64_t rows, cols;
  int64_t stride_batch, stride_row, stride_col;
  const int64_t* num_rows;
  const int64_t* num_cols;
  int64_t* out;
  int32_t* status;
  unsigned char* workspace;   // state of problem b at workspace + b * workspace_stride (global variant)
  size_t workspace_stride;
  size_t shared_state_offset;  // state offset in dynamic shared memory (shared variant)
  StateLayout layout;
  bool maximize;
};

extern __shared__ double lsap_shared_memory[];

__device__ __forceinline__ double load_as_double(const float* p) { return static_cast<double>(__ldg(p)); }
__device__ __forceinline__ double load_as_double(const double* p) { return __ldg(p); }
__device__ __forceinline__ double load_as_double(const __half* p) {
  return static_cast<double>(__half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p)))));
}
__device__ __forceinline__ double load_as_double(const __nv_bfloat16* p) {
  return static_cast<double>(
      __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p)))));
}

// Cost of (row i, column j) in the wide orientation, negated when maximizing.
template <typename Scalar>
struct WideCost {
  const Scalar* base;
  int64_t row_stride;
  int64_t col_stride;
  bool negate;

  __device__ __forceinline__ double operator()(int i, int j) const {
    const double x = load_as_double(base + i * row_stride + j * col_stride);
    return negate ? -x : x;
  }
};

// Strict total order of (path cost, key); keys of real columns are unique, so the minimum is unique.
__device__ __forceinline__ bool precedes(double value, int32_t key, double other_value, int32_t other_key) {
  return value < other_value || (value == other_value && key < other_key);
}

// Butterfly argmin over aligned groups of `width` lanes (a power of two <= 32): every lane of a group ends with
// the group's minimum. All 32 lanes must call it.
__device__ __forceinline__ void warp_argmin(double& value, int32_t& key, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const double other_value = __shfl_xor_sync(kFullWarpMask, value, offset);
    const int32_t other_key = __shfl_xor_sync(kFullWarpMask, key, offset);
    if (precedes(other_value, other_key, value, key)) {
      value = other_value;
      key = other_key;
    }
  }
}

// Block-wide argmin; every thread of the block returns the same (value, key). Contains the only barrier of a
// Dijkstra step. `warp_count_pow2` is the warp count rounded up to a power of two: lane l of every warp loads
// entry l mod warp_count_pow2, so each aligned lane group holds all entries and every lane gets the result.
__device__ __forceinline__ void block_argmin(double& value, int32_t& key, ArgminScratch& scratch, int parity,
                                             int lane, int warp, int warp_count, int warp_count_pow2) {
  warp_argmin(value, key, kWarpSize);
  if (lane == 0) {
    scratch.value[parity][warp] = value;
    scratch.key[parity][warp] = key;
  }
  __syncthreads();
  const int entry = lane & (warp_count_pow2 - 1);
  value = entry < warp_count ? scratch.value[parity][entry] : kInf;
  key = entry < warp_count ? scratch.key[parity][entry] : kNoColumn;
  warp_argmin(value, key, warp_count_pow2);
}

__device__ __forceinline__ int64_t clamp_extent(const int64_t* extents, int64_t b, int64_t full) {
  if (extents == nullptr) return full;
  const int64_t extent = extents[b];
  return extent < 0 ? 0 : (extent > full ? full : extent);
}

template <typename Scalar, bool kStateInShared>
__global__ void __launch_bounds__(kMaxThreads, 1) lsap_kernel(const SolverParams p) {
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int warp_count = threads / kWarpSize;
  int warp_count_pow2 = 1;
  while (warp_count_pow2 < warp_count) warp_count_pow2 *= 2;
  const int64_t b = blockIdx.x;

  unsigned char* shared_bytes = reinterpret_cast<unsigned char*>(lsap_shared_memory);
  ArgminScratch& scratch = *reinterpret_cast<ArgminScratch*>(shared_bytes);
  unsigned char* state = kStateInShared ? shared_bytes + p.shared_state_offset
                                        : p.workspace + static_cast<size_t>(b) * p.workspace_stride;
  double* v = reinterpret_cast<double*>(state + p.layout.v);
  double* path_cost = reinterpret_cast<double*>(state + p.layout.path_cost);
  double* u = reinterpret_cast<double*>(state + p.layout.u);
  double* visit_cost = reinterpret_cast<double*>(state + p.layout.visit_cost);
  int32_t* path = reinterpret_cast<int32_t*>(state + p.layout.path);
  int32_t* row4col = reinterpret_cast<int32_t*>(state + p.layout.row4col);
  int32_t* col4row = reinterpret_cast<int32_t*>(state + p.layout.col4row);
  int32_t* visit_row = reinterpret_cast<int32_t*>(state + p.layout.visit_row);
  unsigned char* scanned = state + p.layout.scanned;

  const int64_t n = clamp_extent(p.num_rows, b, p.rows);
  const int64_t m = clamp_extent(p.num_cols, b, p.cols);
  const bool transposed = n > m;
  const int wide_rows = static_cast<int>(transposed ? m : n);
  const int wide_cols = static_cast<int>(transposed ? n : m);

  // Phase A. Every row starts unassigned; the state is only touched for non-empty problems.
  int64_t* out = p.out + b * p.rows;
  for (int64_t r = tid; r < p.rows; r += threads) out[r] = -1;
  if (wide_rows == 0) {  // uniform: depends on b only
    if (tid == 0) p.status[b] = kStatusOk;
    return;
  }
  const WideCost<Scalar> cost{static_cast<const Scalar*>(p.cost) + b * p.stride_batch,
                              transposed ? p.stride_col : p.stride_row, transposed ? p.stride_row : p.stride_col,
                              p.maximize};
  for (int j = tid; j < wide_cols; j += threads) {
    v[j] = 0.0;
    path_cost[j] = kInf;
    scanned[j] = 0;
    row4col[j] = kNoColumn;  // unclaimed
  }
  __syncthreads();

  // Phase B. A warp takes kRowsPerPass rows at a time so that their loads overlap. Lanes read columns in
  // increasing order and keep the first minimum, the butterfly keeps the lowest index among equal minima: the
  // argmin is the lowest minimizing column. A row without a finite entry keeps u = 0 and claims nothing; its
  // search below finds no finite path and reports infeasibility.
  bool invalid = false;
  for (int first = warp * kRowsPerPass; first < wide_rows; first += warp_count * kRowsPerPass) {
    double row_min[kRowsPerPass];
    int32_t argmin[kRowsPerPass];
#pragma unroll
    for (int k = 0; k < kRowsPerPass; ++k) {
      row_min[k] = kInf;
      argmin[k] = kNoColumn;
    }
    for (int j = lane; j < wide_cols; j += kWarpSize) {
#pragma unroll
      for (int k = 0; k < kRowsPerPass; ++k) {
        if (first + k >= wide_rows) break;
        const double x = cost(first + k, j);
        invalid = invalid || x != x || x == -kInf;
        if (x < row_min[k]) {
          row_min[k] = x;
          argmin[k] = j;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRowsPerPass; ++k) {
      warp_argmin(row_min[k], argmin[k], kWarpSize);  // warp-uniform: every lane calls it for every k
      const int i = first + k;
      if (lane == 0 && i < wide_rows) {
        const bool finite = row_min[k] < kInf;
        u[i] = finite ? row_min[k] : 0.0;
        col4row[i] = finite ? argmin[k] : -1;  // the claim; confirmed in phase C
        if (finite) atomicMin(&row4col[argmin[k]], i);
      }
    }
  }
  if (__syncthreads_or(invalid)) {
    if (tid == 0) p.status[b] = kStatusInvalidEntries;
    return;
  }

  // Phase C. A claimed column holds the lowest claiming row (< kNoColumn), so the owners' writes below touch
  // only unclaimed columns, which no row thread reads.
  for (int i = tid; i < wide_rows; i += threads) {
    const int32_t claimed = col4row[i];
    if (claimed >= 0 && row4col[claimed] != i) col4row[i] = -1;
  }
  for (int j = tid; j < wide_cols; j += threads) {
    if (row4col[j] == kNoColumn) row4col[j] = -1;
  }
  __syncthreads();

  // Phase D. u, row4col and col4row change only in thread 0's tail, between the last barrier of a search and
  // the barrier that ends the tail; during a search every thread only reads them.
  int parity = 0;
  for (int current = 0; current < wide_rows; ++current) {
    if (col4row[current] >= 0) continue;  // uniform: col4row is stable here

    double min_val = 0.0;  // path cost of the last settled column, i.e. of row i
    int i = current;
    int32_t sink = -1;
    int visits = 0;
    while (true) {
      const double u_i = u[i];
      double best = kInf;
      int32_t best_key = kNoColumn;
      for (int j = tid; j < wide_cols; j += threads) {
        if (scanned[j]) continue;
        const double reduced = min_val + cost(i, j) - u_i - v[j];
        double d = path_cost[j];
        if (reduced < d) {
          d = reduced;
          path_cost[j] = reduced;
          path[j] = i;
        }
        const int32_t key = row4col[j] < 0 ? j : (j | kAssignedBit);
        if (precedes(d, key, best, best_key)) {
          best = d;
          best_key = key;
        }
      }
      block_argmin(best, best_key, scratch, parity, lane, warp, warp_count, warp_count_pow2);
      parity ^= 1;
      if (!(best < kInf)) break;  // no finite path to any free column: infeasible
      const int32_t j = best_key & ~kAssignedBit;
      if (j % threads == tid) scanned[j] = 1;  // the owner: it alone reads the flag
      min_val = best;
      // Whether j is free comes from the key, not from row4col: after the last step thread 0 may already be
      // writing row4col in the tail.
      if ((best_key & kAssignedBit) == 0) {
        sink = j;
        break;
      }
      const int32_t next_row = row4col[j];
      if (tid == 0) {
        visit_row[visits] = next_row;
        visit_cost[visits] = best;
      }
      ++visits;
      i = next_row;
    }
    if (sink < 0) {  // uniform: every thread holds the same argmin
      if (tid == 0) p.status[b] = kStatusInfeasible;
      return;
    }

    // Dual update (scipy: v[j] -= minVal - shortestPathCosts[j] on scanned columns, u[i] += minVal -
    // shortestPathCosts[col4row[i]] on visited rows), then augmentation along the path from the sink.
    for (int j = tid; j < wide_cols; j += threads) {
      if (scanned[j]) {
        v[j] -= min_val - path_cost[j];
        scanned[j] = 0;
      }
      path_cost[j] = kInf;
    }
    if (tid == 0) {
      u[current] += min_val;
      for (int k = 0; k < visits; ++k) u[visit_row[k]] += min_val - visit_cost[k];
      int32_t j = sink;
      while (true) {
        const int32_t r = path[j];
        row4col[j] = r;
        const int32_t previous = col4row[r];
        col4row[r] = j;
        j = previous;
        if (r == current) break;
      }
    }
    __syncthreads();
  }

  // Phase E. Every wide row is assigned.
  for (int r = tid; r < wide_rows; r += threads) {
    const int32_t c = col4row[r];
    if (transposed) {
      out[c] = r;
    } else {
      out[r] = c;
    }
  }
  if (tid == 0) p.status[b] = kStatusOk;
}

size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

StateLayout make_state_layout(size_t wide_rows, size_t wide_cols) {
  StateLayout layout{};
  size_t offset = 0;
  auto take = [&offset](size_t bytes) {
    const size_t at = offset;
    offset = align_up(offset + bytes, kStateAlignment);
    return at;
  };
  layout.v = take(wide_cols * sizeof(double));
  layout.path_cost = take(wide_cols * sizeof(double));
  layout.u = take(wide_rows * sizeof(double));
  layout.visit_cost = take(wide_rows * sizeof(double));
  layout.path = take(wide_cols * sizeof(int32_t));
  layout.row4col = take(wide_cols * sizeof(int32_t));
  layout.col4row = take(wide_rows * sizeof(int32_t));
  layout.visit_row = take(wide_rows * sizeof(int32_t));
  layout.scanned = take(wide_cols * sizeof(unsigned char));
  layout.bytes = offset;
  return layout;
}

struct LaunchPlan {
  StateLayout layout;
  bool state_in_shared;
  size_t shared_state_offset;
  size_t shared_bytes;
  size_t workspace_stride;
  size_t workspace_bytes;
  int threads;
};

// False when the arguments cannot be launched.
bool make_launch_plan(int64_t batch, int64_t rows, int64_t cols, LaunchPlan& plan) {
  if (batch < 0 || rows < 0 || cols < 0) return false;
  if (rows > kMaxExtent || cols > kMaxExtent || batch > INT_MAX) return false;
  const size_t wide_rows = static_cast<size_t>(rows < cols ? rows : cols);
  const size_t wide_cols = static_cast<size_t>(rows < cols ? cols : rows);
  plan.layout = make_state_layout(wide_rows, wide_cols);
  plan.shared_state_offset = align_up(sizeof(ArgminScratch), kStateAlignment);
  plan.state_in_shared = plan.shared_state_offset + plan.layout.bytes <= kMaxDynamicSharedBytes;
  plan.shared_bytes = plan.state_in_shared ? plan.shared_state_offset + plan.layout.bytes : sizeof(ArgminScratch);
  plan.workspace_stride = plan.state_in_shared ? 0 : align_up(plan.layout.bytes, kWorkspaceAlignment);
  const size_t problems = static_cast<size_t>(batch);
  if (problems > 0 && plan.workspace_stride > SIZE_MAX / problems) return false;
  plan.workspace_bytes = plan.workspace_stride * problems;
  // One column per thread up to kMaxThreads columns; a multiple of the warp size, as the shuffles need.
  const size_t threads = align_up(wide_cols > 0 ? wide_cols : 1, kWarpSize);
  plan.threads = static_cast<int>(threads < static_cast<size_t>(kMaxThreads) ? threads : kMaxThreads);
  return true;
}

template <typename Scalar>
cudaError_t launch_for_dtype(SolverParams& params, const LaunchPlan& plan, int64_t batch, cudaStream_t stream) {
  void* args[] = {&params};
  const dim3 grid(static_cast<unsigned>(batch));
  const dim3 block(static_cast<unsigned>(plan.threads));
  if (plan.state_in_shared) {
    return cudaLaunchKernel(lsap_kernel<Scalar, true>, grid, block, args, plan.shared_bytes, stream);
  }
  return cudaLaunchKernel(lsap_kernel<Scalar, false>, grid, block, args, plan.shared_bytes, stream);
}

}  // namespace

size_t lsap_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols) {
  LaunchPlan plan{};
  return make_launch_plan(batch, rows, cols, plan) ? plan.workspace_bytes : 0;
}

int lsap_cuda_launch(const void* cost, const char* dtype, int64_t batch, int64_t rows, int64_t cols,
                     int64_t stride_batch, int64_t stride_row, int64_t stride_col, const int64_t* num_rows,
                     const int64_t* num_cols, bool maximize, int64_t* out, int32_t* status, void* workspace,
                     size_t workspace_bytes, void* stream, int device) {
  LaunchPlan plan{};
  if (!make_launch_plan(batch, rows, cols, plan) || dtype == nullptr || device < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool is_half = std::strcmp(dtype, "float16") == 0;
  const bool is_bfloat16 = std::strcmp(dtype, "bfloat16") == 0;
  const bool is_float = std::strcmp(dtype, "float32") == 0;
  const bool is_double = std::strcmp(dtype, "float64") == 0;
  if (!(is_half || is_bfloat16 || is_float || is_double)) return static_cast<int>(cudaErrorInvalidValue);
  if (batch == 0) return static_cast<int>(cudaSuccess);
  if (status == nullptr || (rows > 0 && out == nullptr) || (rows > 0 && cols > 0 && cost == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (plan.workspace_bytes > 0 &&
      (workspace == nullptr || workspace_bytes < plan.workspace_bytes ||
       reinterpret_cast<uintptr_t>(workspace) % kStateAlignment != 0)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }

  SolverParams params{};
  params.cost = cost;
  params.rows = rows;
  params.cols = cols;
  params.stride_batch = stride_batch;
  params.stride_row = stride_row;
  params.stride_col = stride_col;
  params.num_rows = num_rows;
  params.num_cols = num_cols;
  params.out = out;
  params.status = status;
  params.workspace = static_cast<unsigned char*>(workspace);
  params.workspace_stride = plan.workspace_stride;
  params.shared_state_offset = plan.shared_state_offset;
  params.layout = plan.layout;
  params.maximize = maximize;

  // Launch on `device` and restore the caller's current device afterwards.
  int previous_device = -1;
  cudaError_t error = cudaGetDevice(&previous_device);
  if (error != cudaSuccess) return static_cast<int>(error);
  if (previous_device != device) {
    error = cudaSetDevice(device);
    if (error != cudaSuccess) return static_cast<int>(error);
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (is_half) {
    error = launch_for_dtype<__half>(params, plan, batch, cuda_stream);
  } else if (is_bfloat16) {
    error = launch_for_dtype<__nv_bfloat16>(params, plan, batch, cuda_stream);
  } else if (is_float) {
    error = launch_for_dtype<float>(params, plan, batch, cuda_stream);
  } else {
    error = launch_for_dtype<double>(params, plan, batch, cuda_stream);
  }
  // A failed launch leaves its error in the runtime's last-error slot; clear it so that later, unrelated launch
  // checks do not report it again (the error is returned to the caller).
  if (error != cudaSuccess) (void)cudaGetLastError();
  if (previous_device != device) {
    const cudaError_t restore_error = cudaSetDevice(previous_device);
    if (error == cudaSuccess) error = restore_error;
  }
  return static_cast<int>(error);
}

}  // namespace fastvlp
