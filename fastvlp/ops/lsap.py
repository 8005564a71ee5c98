"""Linear sum assignment: a drop-in for scipy's solver and a batched solver for set losses.

Both run on the C++ solver of ``fastvlp._C`` (shortest augmenting paths with a
Jonker-Volgenant initialisation; CPU threads across the batch, or one CUDA thread
block per problem). :mod:`fastvlp.ops.lsap_reference` keeps the scipy loop they
are tested against.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch

from fastvlp._extension import cuda_solver_available, require_extension

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NUMPY_NATIVE = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}

_STATUS_MESSAGES = {1: "matrix contains invalid numeric entries", 2: "cost matrix is infeasible"}


def _raise_for_first_bad_problem(status: torch.Tensor, batched: bool) -> None:
    bad = torch.nonzero(status).flatten()
    if bad.numel() == 0:
        return
    index = int(bad[0])
    message = _STATUS_MESSAGES.get(int(status[index]), f"solver failed with status {int(status[index])}")
    raise ValueError(f"{message} (problem {index})" if batched else message)


def _extent_pointer(extent: Optional[torch.Tensor]) -> int:
    return 0 if extent is None else extent.data_ptr()


def _solve(cost, num_rows, num_cols, maximize, num_threads):
    """Run the native solver; returns ``(assignment [B, N] int64, status [B] int32, first_bad)``,
    where ``first_bad`` is the index of the first problem that failed, -1 if none, or None when
    it is unknown without reading ``status`` (CUDA)."""
    extension = require_extension()
    batch, rows, cols = cost.shape
    assignment = torch.empty((batch, rows), dtype=torch.int64, device=cost.device)
    # The CPU solver writes every problem's status; the CUDA result starts from "ok".
    status = (torch.empty if cost.device.type == "cpu" else torch.zeros)((batch,), dtype=torch.int32, device=cost.device)
    if batch == 0 or rows == 0:
        status.zero_()
        return assignment, status, -1
    common = (cost.data_ptr(), _DTYPE_NAMES[cost.dtype], batch, rows, cols, *cost.stride(),
              _extent_pointer(num_rows), _extent_pointer(num_cols), bool(maximize),
              assignment.data_ptr(), status.data_ptr())
    if cost.device.type == "cpu":
        first_bad = extension.lsap_cpu(*common, int(num_threads) if num_threads > 0 else torch.get_num_threads())
        return assignment, status, first_bad
    if not cuda_solver_available():
        raise RuntimeError("fastvlp._C was built without the CUDA solver; reinstall with a CUDA toolkit on the PATH")
    with torch.cuda.device(cost.device):
        workspace_bytes = extension.lsap_cuda_workspace_bytes(batch, rows, cols)
        # Shared memory holds the solver's state for the model's shapes; larger ones need a workspace.
        workspace = torch.empty((workspace_bytes,), dtype=torch.uint8, device=cost.device) if workspace_bytes else None
        stream = torch.cuda.current_stream(cost.device).cuda_stream
        extension.lsap_cuda(*common, 0 if workspace is None else workspace.data_ptr(), workspace_bytes, stream,
                            cost.device.index)
    return assignment, status, None


def _batched_lsap(
    cost: torch.Tensor,
    num_rows: Optional[torch.Tensor],
    num_cols: Optional[torch.Tensor],
    maximize: bool,
    num_threads: int,
    check_finite: bool,
) -> torch.Tensor:
    batch, rows, cols = cost.shape
    if check_finite:
        # Extents are data: they can only be checked where checking may synchronise.
        check_extent_values(num_rows, num_cols, rows, cols)
    else:
        num_rows = None if num_rows is None else num_rows.clamp(0, rows)
        num_cols = None if num_cols is None else num_cols.clamp(0, cols)
    assignment, status, first_bad = _solve(cost, num_rows, num_cols, maximize, num_threads)
    if check_finite and first_bad != -1:
        _raise_for_first_bad_problem(status.cpu(), batched=True)
    return assignment


# The registered op is what torch.compile traces through. Eager calls skip the custom-op
# dispatcher and call the same function directly: the dispatcher costs about 70 us a call,
# as much as solving a whole 32 x 100 x 20 batch.
_batched_lsap_op = torch.library.custom_op("fastvlp::batched_linear_sum_assignment", mutates_args=())(_batched_lsap)


@_batched_lsap_op.register_fake
def _(cost, num_rows, num_cols, maximize, num_threads, check_finite):
    return cost.new_empty((cost.shape[0], cost.shape[1]), dtype=torch.int64)


def _check_extent(name: str, extent, cost: torch.Tensor) -> Optional[torch.Tensor]:
    if extent is None:
        return None
    if not isinstance(extent, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B] or None, got {type(extent).__name__}")
    if extent.dtype.is_floating_point or extent.dtype.is_complex or extent.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {extent.dtype}")
    if extent.shape != (cost.shape[0],):
        raise ValueError(f"{name} must have shape [B] = [{cost.shape[0]}], got {list(extent.shape)}")
    return extent.to(device=cost.device, dtype=torch.int64).contiguous()


def check_batched_problem(cost, num_rows=None, num_cols=None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check the arguments of :func:`batched_linear_sum_assignment` (not the extents' values, which
    are data); returns the extents as contiguous int64 tensors on ``cost``'s device."""
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape [B, N, M], got {list(cost.shape)}")
    if cost.dtype not in _DTYPE_NAMES:
        raise TypeError(f"cost must be float16, bfloat16, float32 or float64, got {cost.dtype}")
    if cost.device.type not in ("cpu", "cuda"):
        raise ValueError(f"cost must be on the CPU or a CUDA device, got {cost.device}")
    return _check_extent("num_rows", num_rows, cost), _check_extent("num_cols", num_cols, cost)


def check_extent_values(num_rows: Optional[torch.Tensor], num_cols: Optional[torch.Tensor], rows: int, cols: int) -> None:
    """Raise ``ValueError`` naming the extent whose values leave ``[0, rows]`` or ``[0, cols]``."""
    for name, extent, limit in (("num_rows", num_rows, rows), ("num_cols", num_cols, cols)):
        if extent is not None and extent.numel() and bool(((extent < 0) | (extent > limit)).any()):
            raise ValueError(f"{name} must lie in [0, {limit}], got values outside it")


def batched_linear_sum_assignment(
    cost: torch.Tensor,
    num_rows: Optional[torch.Tensor] = None,
    num_cols: Optional[torch.Tensor] = None,
    maximize: bool = False,
    num_threads: Optional[int] = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Solve ``B`` rectangular assignment problems in one call.

    Args:
        cost: ``[B, N, M]`` float16, bfloat16, float32 or float64 tensor, on the CPU or CUDA,
            with any strides. ``+inf`` marks a forbidden pair (``-inf`` when ``maximize``).
        num_rows, num_cols: optional ``[B]`` integer tensors; problem ``b`` is the top-left
            ``num_rows[b] x num_cols[b]`` block of ``cost[b]`` (ragged targets per image
            without building ``B`` tensors). Default: the full extent. Values outside
            ``[0, N]`` (``num_rows``) or ``[0, M]`` (``num_cols``) raise ``ValueError`` when
            ``check_finite`` is set. With ``check_finite=False`` they are not checked but
            clamped to that range: a negative extent gives an empty problem (its row of the
            result is all ``-1``, like any empty problem, not a reported failure) and an extent
            above ``N`` or ``M`` gives the full extent.
        maximize: negate the costs first, as scipy does.
        num_threads: CPU worker threads across the batch (default ``torch.get_num_threads()``;
            honoured even above it). Ignored on CUDA, where one thread block solves each problem.
        check_finite: raise scipy's ``ValueError`` for a problem with NaN or ``-inf`` entries
            (``"matrix contains invalid numeric entries"``) or whose ``+inf`` pattern admits no
            complete assignment (``"cost matrix is infeasible"``), naming the first such problem.
            On CUDA this check synchronises with the host. With ``check_finite=False`` nothing is
            checked and nothing synchronises: a bad problem's row of the result is all ``-1``.

    Returns:
        ``[B, N]`` int64 tensor on ``cost``'s device: the column assigned to each row, or ``-1``
        (rows beyond ``num_rows[b]``, and rows left over when ``N > M``). Each problem's total
        cost is minimal (maximal with ``maximize``); among tied optima any one may be returned.
        The duals are float64: finite entries beyond about 1e307 in magnitude can overflow them, and
        such a problem may be reported infeasible.
    """
    num_rows, num_cols = check_batched_problem(cost, num_rows, num_cols)
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        num_threads = int(num_threads)
    # 0 stands for "torch's thread count", read when the op runs (not while tracing). The native solver
    # reads raw memory, so a lazily negated view (``Tensor.is_neg()``) is materialised first.
    arguments = (cost.detach().resolve_neg(), num_rows, num_cols, bool(maximize), num_threads or 0, bool(check_finite))
    if torch.compiler.is_compiling():
        return torch.ops.fastvlp.batched_linear_sum_assignment(*arguments)
    return _batched_lsap(*arguments)


def _as_float_numpy(matrix: np.ndarray) -> np.ndarray:
    if matrix.dtype in _NUMPY_NATIVE:
        return matrix
    if not np.can_cast(matrix.dtype, np.float64, casting="safe"):
        # scipy's own wording, so code that matches on it keeps working.
        raise TypeError(f"Cannot cast array data from {matrix.dtype!r} to dtype('float64') according to the rule 'safe'")
    return matrix.astype(np.float64)


def _solve_numpy(matrix: np.ndarray, maximize: bool) -> Tuple[np.ndarray, np.ndarray]:
    rows, cols = matrix.shape
    if rows == 0 or cols == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    if any(stride < 0 or stride % matrix.itemsize for stride in matrix.strides):
        matrix = np.ascontiguousarray(matrix)
    status, assignment = require_extension().lsap_cpu_matrix(matrix, bool(maximize))
    if status:
        raise ValueError(_STATUS_MESSAGES.get(status, f"solver failed with status {status}"))
    if rows <= cols:  # every row is assigned
        return np.arange(rows, dtype=np.intp), assignment
    row_ind = np.flatnonzero(assignment >= 0)
    return row_ind, assignment[row_ind]


def linear_sum_assignment(cost_matrix, maximize: bool = False):
    """Drop-in for :func:`scipy.optimize.linear_sum_assignment`.

    Same results and errors: ``row_ind`` is sorted; NaN and ``-inf`` raise
    ``ValueError("matrix contains invalid numeric entries")``; ``+inf`` forbids a pair,
    and a matrix whose ``+inf`` pattern admits no complete assignment raises
    ``ValueError("cost matrix is infeasible")``; non-2-D input raises ``ValueError``,
    and an array that cannot be cast safely to float64 raises ``TypeError``. Other input
    (lists) is converted to float64 as scipy converts it: ``None`` entries are NaN. Empty shapes
    give empty results. Lists and numpy arrays give numpy arrays; a torch tensor gives
    int64 tensors on its own device.
    """
    if isinstance(cost_matrix, torch.Tensor):
        return _linear_sum_assignment_tensor(cost_matrix, maximize)
    if isinstance(cost_matrix, np.ndarray) or _exposes_buffer(cost_matrix):
        # Arrays (and buffers) keep their dtype, then are cast by the safe rule as scipy casts them.
        matrix = np.asarray(cost_matrix)
    else:
        # scipy converts anything else straight to float64: None becomes NaN ("invalid numeric
        # entries"), numeric strings are parsed, and complex or ragged input raises numpy's error.
        matrix = np.asarray(cost_matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {matrix.ndim} array")
    return _solve_numpy(_as_float_numpy(matrix), bool(maximize))


def _exposes_buffer(value) -> bool:
    if isinstance(value, bytes):  # numpy reads bytes as a string scalar, not as a buffer
        return False
    try:
        memoryview(value)
    except TypeError:
        return False
    return True


def _linear_sum_assignment_tensor(cost: torch.Tensor, maximize: bool):
    if cost.dim() != 2:
        raise ValueError(f"expected a matrix (2-D array), got a {cost.dim()} array")
    if cost.dtype not in _DTYPE_NAMES:
        if cost.dtype.is_complex:
            raise TypeError(f"Cannot cast array data from {cost.dtype} to float64 according to the rule 'safe'")
        cost = cost.to(torch.float64)
    if cost.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64, device=cost.device)
        return empty, empty.clone()
    try:
        assignment = batched_linear_sum_assignment(cost.unsqueeze(0), maximize=maximize, num_threads=1)[0]
    except ValueError as error:
        raise ValueError(str(error).replace(" (problem 0)", "")) from None
    row_ind = torch.nonzero(assignment >= 0).flatten()
    return row_ind, assignment[row_ind]
