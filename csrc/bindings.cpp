// fastvlp._C: the compiled kernels, bound on raw pointers and element strides
// so the extension never links libtorch (fast builds, no torch ABI coupling).
// The Python layer (fastvlp/ops) checks tensors and passes data_ptr() values.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lsap/batch_solver.h"
#include "lsap/solver_isa.h"

#if defined(FASTVLP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "lsap/cuda_solver.h"
#endif

namespace py = pybind11;
using fastvlp::lsap::ElementType;

#define FASTVLP_STRINGIFY_(x) #x
#define FASTVLP_STRINGIFY(x) FASTVLP_STRINGIFY_(x)

#ifndef FASTVLP_CXX_COMPILER
#define FASTVLP_CXX_COMPILER "unknown"
#endif
#ifndef FASTVLP_BUILD_TYPE
#define FASTVLP_BUILD_TYPE "unknown"
#endif

namespace {

ElementType parse_dtype(const std::string& dtype) {
  if (dtype == "float16") return ElementType::kFloat16;
  if (dtype == "bfloat16") return ElementType::kBFloat16;
  if (dtype == "float32") return ElementType::kFloat32;
  if (dtype == "float64") return ElementType::kFloat64;
  throw py::value_error("dtype must be one of 'float16', 'bfloat16', 'float32', 'float64', got '" + dtype + "'");
}

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

void check_non_negative(int64_t value, const char* name) {
  if (value < 0) fail(std::string(name) + " must be >= 0, got " + std::to_string(value));
}

// Checks the sizes common to both solvers; messages are built only on failure.
void check_batch_shape(int64_t batch, int64_t rows, int64_t cols, uintptr_t out_ptr, uintptr_t status_ptr) {
  check_non_negative(batch, "batch");
  check_non_negative(rows, "rows");
  check_non_negative(cols, "cols");
  const int64_t limit = int64_t(1) << 31;
  if (rows >= limit || cols >= limit) fail("rows and cols must be < 2**31");
  if (batch > 0 && status_ptr == 0) fail("status_ptr must point at an int32 [batch] buffer, got 0");
  if (batch > 0 && rows > 0 && out_ptr == 0) fail("out_ptr must point at an int64 [batch, rows] buffer, got 0");
}

// Problem sizes from an optional int64 [batch] host array, checked against
// the padded extent before any solving starts.
void check_extents(uintptr_t ptr, int64_t batch, int64_t extent, const char* name) {
  if (ptr == 0) return;
  const int64_t* counts = reinterpret_cast<const int64_t*>(ptr);
  for (int64_t b = 0; b < batch; ++b) {
    if (counts[b] < 0 || counts[b] > extent) {
      fail(std::string(name) + "[" + std::to_string(b) + "] must be in [0, " + std::to_string(extent) + "], got " +
           std::to_string(counts[b]));
    }
  }
}

// Returns the index of the first problem whose status is not ok, or -1, so that callers
// need not scan the status array themselves.
int64_t lsap_cpu(uintptr_t cost_ptr, const std::string& dtype, int64_t batch, int64_t rows, int64_t cols,
              int64_t stride_batch, int64_t stride_row, int64_t stride_col, uintptr_t num_rows_ptr,
              uintptr_t num_cols_ptr, bool maximize, uintptr_t out_ptr, uintptr_t status_ptr, int64_t num_threads) {
  fastvlp::lsap::BatchRequest r;
  r.type = parse_dtype(dtype);
  check_batch_shape(batch, rows, cols, out_ptr, status_ptr);
  if (stride_batch < 0 || stride_row < 0 || stride_col < 0) {
    fail("strides must be >= 0 (in elements), got (" + std::to_string(stride_batch) + ", " +
         std::to_string(stride_row) + ", " + std::to_string(stride_col) + ")");
  }
  if (num_threads < 1) fail("num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t* num_rows = reinterpret_cast<const int64_t*>(num_rows_ptr);
  const int64_t* num_cols = reinterpret_cast<const int64_t*>(num_cols_ptr);
  check_extents(num_rows_ptr, batch, rows, "num_rows");
  check_extents(num_cols_ptr, batch, cols, "num_cols");
  if (cost_ptr == 0) {  // acceptable only when every problem is empty
    for (int64_t b = 0; b < batch; ++b) {
      if ((num_rows ? num_rows[b] : rows) > 0 && (num_cols ? num_cols[b] : cols) > 0) {
        fail("cost_ptr must point at the cost matrices, got 0");
      }
    }
  }
  r.costs = reinterpret_cast<const void*>(cost_ptr);
  r.batch = batch;
  r.rows = rows;
  r.cols = cols;
  r.stride_batch = stride_batch;
  r.stride_row = stride_row;
  r.stride_col = stride_col;
  r.num_rows = num_rows;
  r.num_cols = num_cols;
  r.maximize = maximize;
  r.assignment = reinterpret_cast<int64_t*>(out_ptr);
  r.status = reinterpret_cast<int32_t*>(status_ptr);
  r.num_threads = num_threads;
  {
    py::gil_scoped_release release;
    fastvlp::lsap::solve_batch(r);
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (r.status[b] != 0) return b;
  }
  return -1;
}

// The scipy drop-in's path: one 2-D numpy matrix of float16/32/64, solved on the calling
// thread. Taking the array itself saves the microseconds that pointer extraction costs in
// Python, which matter when each call solves a small matrix. Returns (status, assignment).
py::tuple lsap_cpu_matrix(const py::array& cost, bool maximize) {
  if (cost.ndim() != 2) fail("cost must be a 2-D array, got " + std::to_string(cost.ndim()) + " dimensions");
  const py::dtype dtype = cost.dtype();
  const int64_t itemsize = dtype.itemsize();
  if (dtype.kind() != 'f' || dtype.byteorder() == '>') fail("cost must be a native-endian float array");
  fastvlp::lsap::BatchRequest r;
  r.type = itemsize == 2 ? ElementType::kFloat16
         : itemsize == 4 ? ElementType::kFloat32
         : itemsize == 8 ? ElementType::kFloat64
                         : (fail("cost must be float16, float32 or float64"), ElementType::kFloat64);
  const int64_t rows = cost.shape(0), cols = cost.shape(1);
  const int64_t stride_row = cost.strides(0), stride_col = cost.strides(1);
  if (stride_row < 0 || stride_col < 0 || stride_row % itemsize || stride_col % itemsize) {
    fail("cost strides must be non-negative multiples of the element size");
  }
  py::array_t<int64_t> assignment(rows);
  int32_t status = 0;
  r.costs = cost.data();
  r.batch = 1;
  r.rows = rows;
  r.cols = cols;
  r.stride_batch = 0;
  r.stride_row = stride_row / itemsize;
  r.stride_col = stride_col / itemsize;
  r.num_rows = nullptr;
  r.num_cols = nullptr;
  r.maximize = maximize;
  r.assignment = assignment.mutable_data();
  r.status = &status;
  r.num_threads = 1;
  if (rows > 0) {
    py::gil_scoped_release release;
    fastvlp::lsap::solve_batch(r);
  }
  return py::make_tuple(status, assignment);
}

#if defined(FASTVLP_WITH_CUDA)
void lsap_cuda(uintptr_t cost_ptr, const std::string& dtype, int64_t batch, int64_t rows, int64_t cols,
               int64_t stride_batch, int64_t stride_row, int64_t stride_col, uintptr_t num_rows_ptr,
               uintptr_t num_cols_ptr, bool maximize, uintptr_t out_ptr, uintptr_t status_ptr, uintptr_t workspace_ptr,
               uint64_t workspace_bytes, uintptr_t stream_ptr, int device) {
  parse_dtype(dtype);
  check_batch_shape(batch, rows, cols, out_ptr, status_ptr);
  if (device < 0) fail("device must be a CUDA device index >= 0, got " + std::to_string(device));
  if (batch > 0 && rows > 0 && cols > 0 && cost_ptr == 0) fail("cost_ptr must point at the cost matrices, got 0");
  const size_t needed = fastvlp::lsap_cuda_workspace_bytes(batch, rows, cols);
  if (workspace_bytes < needed) {
    fail("workspace_bytes must be >= lsap_cuda_workspace_bytes(batch, rows, cols) = " + std::to_string(needed) +
         ", got " + std::to_string(workspace_bytes));
  }
  if (needed > 0 && workspace_ptr == 0) fail("workspace_ptr must point at a device buffer, got 0");
  int error;
  {
    py::gil_scoped_release release;
    error = fastvlp::lsap_cuda_launch(
        reinterpret_cast<const void*>(cost_ptr), dtype.c_str(), batch, rows, cols, stride_batch, stride_row,
        stride_col, reinterpret_cast<const int64_t*>(num_rows_ptr), reinterpret_cast<const int64_t*>(num_cols_ptr),
        maximize, reinterpret_cast<int64_t*>(out_ptr), reinterpret_cast<int32_t*>(status_ptr),
        reinterpret_cast<void*>(workspace_ptr), size_t(workspace_bytes), reinterpret_cast<void*>(stream_ptr), device);
  }
  if (error == 0) return;
  const std::string what = std::string("lsap_cuda failed: ") +
                           cudaGetErrorString(static_cast<cudaError_t>(error)) + " (CUDA error " +
                           std::to_string(error) + ")";
  if (error == int(cudaErrorInvalidValue)) fail(what);
  throw std::runtime_error(what);
}
#endif

py::dict build_info() {
  py::dict info;
  py::list archs;
#if defined(FASTVLP_WITH_CUDA)
  info["cuda"] = true;
  const std::string arch_list = FASTVLP_CUDA_ARCHS;  // "sm_80,sm_90,..."
  size_t start = 0;
  while (start < arch_list.size()) {
    size_t end = arch_list.find(',', start);
    if (end == std::string::npos) end = arch_list.size();
    if (end > start) archs.append(arch_list.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
  info["cuda_compiler"] = FASTVLP_CUDA_COMPILER;
  info["cuda_runtime_version"] = FASTVLP_CUDA_RUNTIME_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = archs;
  info["cuda_compiler"] = py::none();
  info["cuda_runtime_version"] = py::none();
#endif
  info["cxx_compiler"] = FASTVLP_CXX_COMPILER;
  info["pybind11_version"] = FASTVLP_STRINGIFY(PYBIND11_VERSION_MAJOR) "." FASTVLP_STRINGIFY(
      PYBIND11_VERSION_MINOR) "." FASTVLP_STRINGIFY(PYBIND11_VERSION_PATCH);
  info["build_type"] = FASTVLP_BUILD_TYPE;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvlp compiled kernels (pointer-based; see fastvlp.ops for the tensor API)";

  m.def("build_info", &build_info,
        "How this extension was built: cuda (bool), cuda_archs, cxx_compiler, cuda_compiler, "
        "cuda_runtime_version, pybind11_version, build_type.");

  m.def("lsap_cpu", &lsap_cpu, py::arg("cost_ptr"), py::arg("dtype"), py::arg("batch"), py::arg("rows"),
        py::arg("cols"), py::arg("stride_batch"), py::arg("stride_row"), py::arg("stride_col"),
        py::arg("num_rows_ptr"), py::arg("num_cols_ptr"), py::arg("maximize"), py::arg("out_ptr"),
        py::arg("status_ptr"), py::arg("num_threads"),
        "Batched minimum-cost rectangular assignment on the CPU (shortest augmenting paths, float64 duals).\n"
        "Problem b is the top-left num_rows[b] x num_cols[b] block of costs[b] (int64 [batch] arrays, or 0 "
        "for the full extent); strides are in elements. Writes out (int64 [batch, rows], contiguous): the "
        "column of each row or -1, and status (int32 [batch]): 0 ok, 1 invalid entries (NaN, or -inf "
        "after the maximize sign flip), 2 infeasible (+inf marks a forbidden pair). Releases the GIL and "
        "uses min(num_threads, batch) native threads. Returns the index of the first problem whose status "
        "is not 0, or -1.");

  m.def("lsap_cpu_matrix", &lsap_cpu_matrix, py::arg("cost"), py::arg("maximize"),
        "One problem given as a 2-D float16/32/64 numpy array (non-negative strides), solved on the calling "
        "thread. Returns (status, assignment): the status code of lsap_cpu and the int64 column of each row "
        "or -1.");
  m.def("lsap_cpu_isas", &fastvlp::lsap::available_cpu_isas,
        "The CPU builds of the assignment solver this machine can run (always 'baseline').");
  m.def("lsap_cpu_isa", &fastvlp::lsap::active_cpu_isa, "The CPU build lsap_cpu uses now.");
  m.def(
      "set_lsap_cpu_isa",
      [](const std::string& name) {
        try {
          fastvlp::lsap::select_cpu_isa(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"), "Choose the CPU build: 'auto' (default, the best available) or a name from lsap_cpu_isas().");

#if defined(FASTVLP_WITH_CUDA)
  m.def("lsap_cuda_workspace_bytes", &fastvlp::lsap_cuda_workspace_bytes, py::arg("batch"), py::arg("rows"),
        py::arg("cols"),
        "Bytes of device workspace lsap_cuda needs for a batch of rows x cols problems (0 when shared memory "
        "suffices).");
  m.def("lsap_cuda", &lsap_cuda, py::arg("cost_ptr"), py::arg("dtype"), py::arg("batch"), py::arg("rows"),
        py::arg("cols"), py::arg("stride_batch"), py::arg("stride_row"), py::arg("stride_col"),
        py::arg("num_rows_ptr"), py::arg("num_cols_ptr"), py::arg("maximize"), py::arg("out_ptr"),
        py::arg("status_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("stream_ptr"),
        py::arg("device"),
        "Batched assignment on a CUDA device, one thread block per problem, enqueued on stream_ptr (a "
        "cudaStream_t) without synchronising. Same problem layout, outputs and status codes as lsap_cpu; all "
        "pointers are device pointers (num_rows_ptr/num_cols_ptr may be 0). Raises ValueError for invalid "
        "arguments and RuntimeError for CUDA errors.");
#endif
}
