"""The CUDA batched assignment solver (fastvlp._C.lsap_cuda) against scipy and the CPU solver."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsap

from fastvlp.ops import batched_linear_sum_assignment

try:
    from fastvlp import _C
except ImportError:  # a source checkout that was never built
    _C = None

DEVICE = "cuda"
HAS_CUDA_SOLVER = _C is not None and hasattr(_C, "lsap_cuda") and torch.cuda.is_available()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_SOLVER, reason="needs a CUDA GPU and fastvlp._C built with the CUDA solver"),
]

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
STATUS_OK, STATUS_INVALID, STATUS_INFEASIBLE = 0, 1, 2
UNWRITTEN = 7777  # sentinel in the output buffers: the solver must overwrite every entry


def current_stream_handle():
    return torch.cuda.current_stream().cuda_stream


def extent_pointer(extent):
    return 0 if extent is None else extent.data_ptr()


def solve_cuda(cost, num_rows=None, num_cols=None, maximize=False):
    """Run the CUDA solver on ``cost`` ([B, N, M] on the GPU, any strides); returns (assignment, status) on the CPU."""
    batch, rows, cols = cost.shape
    out = torch.full((batch, rows), UNWRITTEN, dtype=torch.int64, device=cost.device)
    status = torch.full((batch,), UNWRITTEN, dtype=torch.int32, device=cost.device)
    workspace_bytes = _C.lsap_cuda_workspace_bytes(batch, rows, cols)
    workspace = torch.full((max(workspace_bytes, 1),), 0xA5, dtype=torch.uint8, device=cost.device)  # garbage
    _C.lsap_cuda(cost.data_ptr(), DTYPE_NAMES[cost.dtype], batch, rows, cols, *cost.stride(),
                 extent_pointer(num_rows), extent_pointer(num_cols), bool(maximize), out.data_ptr(),
                 status.data_ptr(), workspace.data_ptr(), workspace_bytes, current_stream_handle(),
                 cost.device.index)
    return out.cpu(), status.cpu()


def solve_cpu(cost, num_rows=None, num_cols=None, maximize=False):
    """The CPU solver of fastvlp._C on the same problems (copied to the host)."""
    cost = cost.cpu()
    num_rows = None if num_rows is None else num_rows.cpu()
    num_cols = None if num_cols is None else num_cols.cpu()
    batch, rows, cols = cost.shape
    out = torch.full((batch, rows), UNWRITTEN, dtype=torch.int64)
    status = torch.full((batch,), UNWRITTEN, dtype=torch.int32)
    _C.lsap_cpu(cost.data_ptr(), DTYPE_NAMES[cost.dtype], batch, rows, cols, *cost.stride(),
                extent_pointer(num_rows), extent_pointer(num_cols), bool(maximize), out.data_ptr(),
                status.data_ptr(), 2)
    return out, status


def scipy_reference(block, maximize):
    """(status, optimal total) of one float64 block according to scipy."""
    if block.size == 0:
        return STATUS_OK, 0.0
    try:
        rows, cols = scipy_lsap(block, maximize=maximize)
    except ValueError as error:
        return (STATUS_INVALID if "invalid" in str(error) else STATUS_INFEASIBLE), None
    return STATUS_OK, block[rows, cols].sum()


def extents(num_rows, num_cols, batch, rows, cols):
    n = [rows] * batch if num_rows is None else num_rows.tolist()
    m = [cols] * batch if num_cols is None else num_cols.tolist()
    return n, m


def assignment_total(block, chosen, n, m, problem):
    """Checks that ``chosen`` (one output row) is a complete, valid assignment of ``block``; returns its total."""
    assert ((chosen >= -1) & (chosen < max(m, 1))).all(), f"problem {problem}: entries out of range: {chosen}"
    assert (chosen[n:] == -1).all(), f"problem {problem}: rows beyond num_rows were assigned"
    matched_rows = np.flatnonzero(chosen[:n] >= 0)
    matched_cols = chosen[matched_rows]
    assert len(matched_rows) == min(n, m), f"problem {problem}: {len(matched_rows)} pairs, expected {min(n, m)}"
    assert len(set(matched_cols.tolist())) == len(matched_cols), f"problem {problem}: a column used twice"
    total = block[matched_rows, matched_cols].sum()
    assert np.isfinite(total), f"problem {problem}: a forbidden pair was used"
    return total


def assert_matches_scipy(cost, assignment, status, num_rows=None, num_cols=None, maximize=False):
    """Status and optimal total of every problem agree with scipy (in float64, on the input's own values)."""
    matrices = cost.double().cpu().numpy()
    batch, rows, cols = matrices.shape
    ns, ms = extents(num_rows, num_cols, batch, rows, cols)
    for problem, (n, m) in enumerate(zip(ns, ms)):
        block = matrices[problem, :n, :m]
        expected_status, expected_total = scipy_reference(block, maximize)
        assert int(status[problem]) == expected_status, (
            f"problem {problem}: status {int(status[problem])}, scipy says {expected_status}")
        chosen = assignment[problem].numpy()
        if expected_status != STATUS_OK:
            assert (chosen == -1).all(), f"problem {problem}: a bad problem must leave every row at -1"
            continue
        total = assignment_total(block, chosen, n, m, problem)
        assert np.isclose(total, expected_total, rtol=1e-9, atol=1e-9), (
            f"problem {problem}: total {total}, scipy {expected_total}")


@pytest.fixture
def generator(fresh_seed):
    return torch.Generator(device=DEVICE).manual_seed(fresh_seed)


def random_cost(shape, generator, dtype=torch.float32, scale=10.0, offset=-3.0):
    return (torch.rand(shape, generator=generator, device=DEVICE, dtype=torch.float64) * scale + offset).to(dtype)


# Batches of 1 and 64, wide, tall and square, column counts on both sides of warp and block-size boundaries
# (block sizes are multiples of 32 up to 512 threads, so 900 columns give threads with two columns each).
SHAPES = [(1, 1, 1), (1, 7, 7), (3, 5, 9), (3, 9, 5), (64, 100, 50), (32, 100, 20), (32, 20, 100), (8, 33, 65),
          (4, 100, 100), (2, 300, 100), (2, 50, 900)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_matches_scipy(shape, dtype, generator):
    cost = random_cost(shape, generator, dtype)
    assert_matches_scipy(cost, *solve_cuda(cost))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 30, 12), (16, 12, 30), (4, 64, 64)])
def test_half_precision_inputs(dtype, shape, generator):
    # Quantised values (ties are likely); the solver must read exactly the half values (compared in float64).
    cost = random_cost(shape, generator, dtype, scale=4.0, offset=-1.0)
    assert_matches_scipy(cost, *solve_cuda(cost))


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 12, 5), (8, 5, 12), (4, 40, 40)])
def test_tie_heavy_matches_scipy(shape, generator):
    cost = torch.randint(0, 3, shape, generator=generator, device=DEVICE).double()
    assert_matches_scipy(cost, *solve_cuda(cost))


@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 4, 9), (2, 9, 4), (1, 40, 600)])
def test_constant_matrix_gives_identity(shape):
    # scipy's contract: a constant matrix gives the identity (rows beyond the columns stay unassigned).
    batch, rows, cols = shape
    assignment, status = solve_cuda(torch.full(shape, 2.5, device=DEVICE))
    expected = torch.arange(rows).where(torch.arange(rows) < cols, torch.tensor(-1)).expand(batch, -1)
    assert torch.equal(status, torch.zeros(batch, dtype=torch.int32))
    assert torch.equal(assignment, expected)


@pytest.mark.parametrize("shape", [(6, 9, 13), (6, 13, 9)])
def test_maximize(shape, generator):
    cost = random_cost(shape, generator, torch.float64)
    assert_matches_scipy(cost, *solve_cuda(cost, maximize=True), maximize=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 10, 10), (8, 6, 15), (8, 15, 6)])
def test_forbidden_pairs_feasible(dtype, shape, generator):
    batch, rows, cols = shape
    cost = random_cost(shape, generator, torch.float64)
    forbidden = torch.rand(shape, generator=generator, device=DEVICE) < 0.6
    # Keep one complete assignment allowed so that every problem stays feasible.
    keep = torch.arange(min(rows, cols), device=DEVICE)
    forbidden[:, keep, keep] = False
    cost = cost.masked_fill(forbidden, float("inf")).to(dtype)
    assignment, status = solve_cuda(cost)
    assert (status == STATUS_OK).all()
    assert_matches_scipy(cost, assignment, status)


@pytest.mark.parametrize("transpose", [False, True])
def test_infeasible_problems_in_a_mixed_batch(transpose, generator):
    cost = random_cost((4, 5, 8), generator, torch.float64)
    cost[1, 2, :] = float("inf")  # a row without any allowed column
    cost[2, :3, 2:] = float("inf")  # three rows share two allowed columns (Hall's condition fails)
    cost[3, :, 0] = float("nan")  # invalid entries take precedence
    cost[3, 0, :] = float("inf")
    if transpose:
        cost = cost.transpose(1, 2)
    assignment, status = solve_cuda(cost)
    assert status.tolist() == [STATUS_OK, STATUS_INFEASIBLE, STATUS_INFEASIBLE, STATUS_INVALID]
    assert_matches_scipy(cost, assignment, status)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("shape", [(3, 6, 9), (3, 9, 6)])
def test_invalid_entries(bad, shape, generator):
    cost = random_cost(shape, generator, torch.float32)
    cost[1, shape[1] - 1, shape[2] - 1] = bad
    assignment, status = solve_cuda(cost)
    assert status.tolist() == [STATUS_OK, STATUS_INVALID, STATUS_OK]
    assert (assignment[1] == -1).all()
    assert_matches_scipy(cost, assignment, status)


def test_infinities_when_maximizing(generator):
    cost = random_cost((3, 5, 7), generator, torch.float64)
    cost[0, 1, 2] = float("inf")  # -inf after the negation: invalid
    cost[1, 1, 2] = float("-inf")  # +inf after the negation: a forbidden pair
    assignment, status = solve_cuda(cost, maximize=True)
    assert status.tolist() == [STATUS_INVALID, STATUS_OK, STATUS_OK]
    assert assignment[1, 1] != 2
    assert_matches_scipy(cost, assignment, status, maximize=True)


SWEEP_VALUES = [0.0, 1.0, 2.0, 3.5, -1.0, float("inf")]  # ties, a negative value and forbidden pairs
SWEEP_SIZE = 12


def small_problem_sweep(seed, count=150, size=SWEEP_SIZE):
    """``2 * count`` problems of 1..size x 1..size entries drawn from SWEEP_VALUES, each followed by its
    transpose (both orientations of the same values), padded with NaN to one [B, size, size] float64 batch;
    returns (cost, num_rows, num_cols) on the CPU."""
    rng = np.random.default_rng(seed)
    cost = np.full((2 * count, size, size), np.nan)
    num_rows, num_cols = np.zeros(2 * count, np.int64), np.zeros(2 * count, np.int64)
    for k in range(count):
        n, m = (int(x) for x in rng.integers(1, size + 1, 2))
        block = rng.choice(SWEEP_VALUES, size=(n, m))
        cost[2 * k, :n, :m], num_rows[2 * k], num_cols[2 * k] = block, n, m
        cost[2 * k + 1, :m, :n], num_rows[2 * k + 1], num_cols[2 * k + 1] = block.T, m, n
    return torch.from_numpy(cost), torch.from_numpy(num_rows), torch.from_numpy(num_cols)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_problems_with_ties_and_forbidden_pairs(dtype, maximize, fresh_seed):
    """The CUDA analogue of test_lsap_core's hypothesis test: small tall, wide and square problems with ties,
    negative values and +inf, solved as one ragged batch (NaN padding that must never be read)."""
    cost, num_rows, num_cols = small_problem_sweep(fresh_seed)
    if maximize:
        cost = -cost  # keep +inf as the forbidden value after the sign flip: -inf is forbidden when maximizing
    assert (num_rows > num_cols).any() and (num_rows < num_cols).any() and (num_rows == num_cols).any()
    cost = cost.to(DEVICE, dtype)
    num_rows, num_cols = num_rows.to(DEVICE), num_cols.to(DEVICE)
    assignment, status = solve_cuda(cost, num_rows, num_cols, maximize=maximize)
    assert_matches_scipy(cost, assignment, status, num_rows.cpu(), num_cols.cpu(), maximize=maximize)
    assert (status == STATUS_OK).any()
    # The same batch as a transposed view (strides swapped), with the extents swapped with it.
    flipped = cost.transpose(1, 2)
    flipped_assignment, flipped_status = solve_cuda(flipped, num_cols, num_rows, maximize=maximize)
    assert torch.equal(flipped_status, status)
    assert_matches_scipy(flipped, flipped_assignment, flipped_status, num_cols.cpu(), num_rows.cpu(),
                         maximize=maximize)
    # The public API runs the same kernel: the same assignment, and check_finite names the first bad problem.
    public = batched_linear_sum_assignment(cost, num_rows, num_cols, maximize=maximize, check_finite=False)
    assert public.device == cost.device and torch.equal(public.cpu(), assignment)
    bad = torch.nonzero(status).flatten().tolist()
    if bad:
        message = "cost matrix is infeasible" if int(status[bad[0]]) == STATUS_INFEASIBLE else "invalid numeric entries"
        with pytest.raises(ValueError, match=rf"{message} \(problem {bad[0]}\)"):
            batched_linear_sum_assignment(cost, num_rows, num_cols, maximize=maximize)
    else:
        checked = batched_linear_sum_assignment(cost, num_rows, num_cols, maximize=maximize)
        assert torch.equal(checked.cpu(), assignment)


@pytest.mark.parametrize("shape", [(12, 9, 14), (12, 14, 9), (6, 40, 2000)])
def test_ragged_extents_ignore_the_padding(shape, generator):
    batch, rows, cols = shape
    cost = random_cost(shape, generator, torch.float32)
    num_rows = torch.randint(0, rows + 1, (batch,), generator=generator, device=DEVICE)
    num_cols = torch.randint(0, cols + 1, (batch,), generator=generator, device=DEVICE)
    num_rows[:2] = torch.tensor([0, rows], device=DEVICE)  # an empty problem and a full-height one
    num_cols[:2] = torch.tensor([cols, 0], device=DEVICE)
    # NaN in the padding: reading it would make the problem invalid.
    inside = ((torch.arange(rows, device=DEVICE)[None, :, None] < num_rows[:, None, None])
              & (torch.arange(cols, device=DEVICE)[None, None, :] < num_cols[:, None, None]))
    cost = cost.masked_fill(~inside, float("nan"))
    assignment, status = solve_cuda(cost, num_rows, num_cols)
    assert (status == STATUS_OK).all()
    assert (assignment[:2] == -1).all()
    assert_matches_scipy(cost, assignment, status, num_rows.cpu(), num_cols.cpu())


def test_non_contiguous_strides(generator):
    base = random_cost((3, 24, 34), generator, torch.float64)
    transposed = base.transpose(1, 2)
    assert_matches_scipy(transposed, *solve_cuda(transposed))
    sliced = base[:, ::2, 1::3]
    assert not sliced.is_contiguous()
    assert_matches_scipy(sliced, *solve_cuda(sliced))
    expanded = base[:1, :, :20].expand(5, -1, -1)  # batch stride 0: five copies of one problem
    assignment, status = solve_cuda(expanded)
    assert_matches_scipy(expanded, assignment, status)
    assert all(torch.equal(assignment[0], row) for row in assignment)


@pytest.mark.parametrize("shape", [(3, 40, 2000), (3, 2000, 40), (2, 1000, 1000)])
def test_large_shapes_keep_their_state_in_the_workspace(shape, generator):
    batch, rows, cols = shape
    # Solver state of these shapes exceeds 48 KiB of shared memory, so it lives in the workspace.
    assert _C.lsap_cuda_workspace_bytes(batch, rows, cols) > 0
    cost = random_cost(shape, generator, torch.float32)
    assert_matches_scipy(cost, *solve_cuda(cost))


def test_detr_shapes_need_no_workspace():
    for rows, cols in [(100, 50), (100, 1000), (900, 50), (300, 100)]:
        assert _C.lsap_cuda_workspace_bytes(64, rows, cols) == 0


def test_empty_shapes():
    assert _C.lsap_cuda_workspace_bytes(0, 5, 5) == 0
    empty_batch = torch.rand(0, 4, 6, device=DEVICE)
    assignment, status = solve_cuda(empty_batch)
    assert assignment.shape == (0, 4) and status.shape == (0,)
    no_columns = torch.rand(3, 4, 0, device=DEVICE)
    assignment, status = solve_cuda(no_columns)
    assert (assignment == -1).all() and (status == STATUS_OK).all()
    no_rows = torch.rand(3, 0, 4, device=DEVICE)
    assignment, status = solve_cuda(no_rows)
    assert assignment.shape == (3, 0) and (status == STATUS_OK).all()


@pytest.mark.skipif(_C is None or not hasattr(_C, "lsap_cpu"), reason="needs the CPU solver")
@pytest.mark.parametrize("shape", [(16, 30, 12), (16, 12, 30), (8, 25, 25)])
def test_matches_cpu_solver(shape, generator):
    batch, rows, cols = shape
    cost = random_cost(shape, generator, torch.float32)
    cost[: batch // 2] = cost[: batch // 2].round()  # ties in half of the batch
    cost = cost.masked_fill(torch.rand(shape, generator=generator, device=DEVICE) < 0.5, float("inf"))
    cost[1, 0, 0] = float("nan")
    num_rows = torch.randint(0, rows + 1, (batch,), generator=generator, device=DEVICE)
    num_cols = torch.randint(0, cols + 1, (batch,), generator=generator, device=DEVICE)
    gpu_assignment, gpu_status = solve_cuda(cost, num_rows, num_cols)
    cpu_assignment, cpu_status = solve_cpu(cost, num_rows, num_cols)
    assert torch.equal(gpu_status, cpu_status)
    matrices = cost.double().cpu().numpy()
    ns, ms = extents(num_rows, num_cols, batch, rows, cols)
    for problem, (n, m) in enumerate(zip(ns, ms)):
        block = matrices[problem, :n, :m]
        if int(gpu_status[problem]) != STATUS_OK:
            assert (gpu_assignment[problem] == -1).all() and (cpu_assignment[problem] == -1).all()
            continue
        gpu_total = assignment_total(block, gpu_assignment[problem].numpy(), n, m, problem)
        cpu_total = assignment_total(block, cpu_assignment[problem].numpy(), n, m, problem)
        assert np.isclose(gpu_total, cpu_total, rtol=1e-9, atol=1e-9), f"problem {problem}"
    assert_matches_scipy(cost, gpu_assignment, gpu_status, num_rows.cpu(), num_cols.cpu())


def test_runs_on_a_side_stream_and_is_deterministic(generator):
    cost = torch.randint(0, 4, (16, 30, 45), generator=generator, device=DEVICE).float()
    first, first_status = solve_cuda(cost)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second, second_status = solve_cuda(cost)
    assert torch.equal(first, second) and torch.equal(first_status, second_status)
    assert_matches_scipy(cost, first, first_status)


def test_rejects_bad_arguments():
    cost = torch.rand(2, 3, 4, device=DEVICE)
    out = torch.empty(2, 3, dtype=torch.int64, device=DEVICE)
    status = torch.empty(2, dtype=torch.int32, device=DEVICE)
    arguments = dict(cost_ptr=cost.data_ptr(), dtype="float32", batch=2, rows=3, cols=4, stride_batch=12,
                     stride_row=4, stride_col=1, num_rows_ptr=0, num_cols_ptr=0, maximize=False,
                     out_ptr=out.data_ptr(), status_ptr=status.data_ptr(), workspace_ptr=0, workspace_bytes=0,
                     stream_ptr=current_stream_handle(), device=cost.device.index)

    def call(**changes):
        _C.lsap_cuda(*{**arguments, **changes}.values())

    call()  # the valid call works
    with pytest.raises((ValueError, RuntimeError)):
        call(dtype="int32")
    with pytest.raises((ValueError, RuntimeError)):
        call(rows=-1)
    big = torch.rand(1, 40, 2000, device=DEVICE)
    big_out = torch.empty(1, 40, dtype=torch.int64, device=DEVICE)
    needed = _C.lsap_cuda_workspace_bytes(1, 40, 2000)
    small_workspace = torch.empty(needed - 1, dtype=torch.uint8, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError)):  # workspace too small
        call(cost_ptr=big.data_ptr(), batch=1, rows=40, cols=2000, stride_batch=80000, stride_row=2000,
             out_ptr=big_out.data_ptr(), workspace_ptr=small_workspace.data_ptr(), workspace_bytes=needed - 1)
