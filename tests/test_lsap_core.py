"""The C++ batched assignment solver, fastvlp._C.lsap_cpu, called directly on raw buffers.

Every problem is checked against scipy.optimize.linear_sum_assignment in float64: the same
status (ok / invalid entries / infeasible) and, when solvable, a valid assignment with the
optimal total cost.
"""
import multiprocessing
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment as scipy_lsap

_C = pytest.importorskip("fastvlp._C", reason="fastvlp._C is not built (pip install -e . --no-build-isolation)")

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
OK, INVALID, INFEASIBLE = 0, 1, 2


@pytest.fixture(params=_C.lsap_cpu_isas())
def isa(request):
    """Run the test on every CPU build of the solver this machine supports."""
    _C.set_lsap_cpu_isa(request.param)
    yield request.param
    _C.set_lsap_cpu_isa("auto")


@pytest.fixture
def generator(fresh_seed):
    return torch.Generator().manual_seed(fresh_seed)


def solve(cost, num_rows=None, num_cols=None, maximize=False, num_threads=1):
    """Call lsap_cpu on a [B, N, M] tensor of any non-negative strides; returns (assignment, status)."""
    batch, rows, cols = cost.shape
    assignment = np.full((batch, rows), 12345, dtype=np.int64)  # every entry must be overwritten
    status = np.full(batch, 99, dtype=np.int32)
    extents = [None if e is None else np.ascontiguousarray(e, dtype=np.int64) for e in (num_rows, num_cols)]
    pointers = [0 if e is None else e.ctypes.data for e in extents]
    _C.lsap_cpu(cost.data_ptr(), DTYPE_NAMES[cost.dtype], batch, rows, cols, *cost.stride(), *pointers,
                maximize, assignment.ctypes.data, status.ctypes.data, num_threads)
    return assignment, status


def scipy_outcome(block, maximize):
    """(status, optimal total) from scipy; the total is None when scipy raises."""
    try:
        rows, cols = scipy_lsap(block, maximize=maximize)
    except ValueError as error:
        return (INVALID if "invalid" in str(error) else INFEASIBLE), None
    return OK, block[rows, cols].sum()


def check_against_scipy(cost, assignment, status, num_rows=None, num_cols=None, maximize=False):
    matrices = cost.double().numpy()
    batch, rows, cols = matrices.shape
    for b in range(batch):
        n = rows if num_rows is None else int(num_rows[b])
        m = cols if num_cols is None else int(num_cols[b])
        block = matrices[b, :n, :m]
        expected_status, expected_total = scipy_outcome(block, maximize) if n and m else (OK, 0.0)
        assert status[b] == expected_status, f"problem {b} ({n}x{m}): status {status[b]}, scipy {expected_status}"
        chosen = assignment[b]
        if expected_status != OK:
            assert (chosen == -1).all(), f"problem {b}: a failed problem must be all -1"
            continue
        assert (chosen[n:] == -1).all(), f"problem {b}: rows beyond num_rows were assigned"
        matched = np.flatnonzero(chosen[:n] >= 0)
        assert (chosen[:n][chosen[:n] < 0] == -1).all()
        assert len(matched) == min(n, m), f"problem {b}: {len(matched)} pairs, expected {min(n, m)}"
        columns = chosen[matched]
        assert (columns < m).all() and len(np.unique(columns)) == len(columns), f"problem {b}: bad columns"
        total = block[matched, columns].sum()
        assert np.isfinite(total), f"problem {b}: a forbidden pair was used"
        assert np.isclose(total, expected_total, rtol=1e-9, atol=1e-9), f"problem {b}: {total} vs scipy {expected_total}"


SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (9, 9), (13, 30), (30, 13), (20, 100), (100, 20), (33, 33), (48, 61)]


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_random_float32_matches_scipy(isa, generator, rows, cols):
    cost = torch.rand(6, rows, cols, generator=generator)
    check_against_scipy(cost, *solve(cost))


@pytest.mark.parametrize("rows,cols", [(8, 8), (12, 17), (17, 12), (40, 40), (25, 60)])
def test_tie_heavy_small_integers(isa, generator, rows, cols):
    cost = torch.randint(0, 4, (10, rows, cols), generator=generator).double()
    check_against_scipy(cost, *solve(cost))
    cost = torch.randint(-2, 3, (10, rows, cols), generator=generator).float()
    check_against_scipy(cost, *solve(cost, maximize=True), maximize=True)


@pytest.mark.parametrize("rows,cols", [(8, 8), (3, 9), (9, 3), (1, 4)])
def test_constant_matrix_gives_the_identity(isa, rows, cols):
    cost = torch.full((2, rows, cols), 1.5)
    assignment, status = solve(cost)
    expected = np.where(np.arange(rows) < cols, np.arange(rows), -1)
    assert (status == OK).all()
    assert (assignment == expected).all()


def test_identity_costs_and_known_small_problems(isa):
    cost = torch.tensor([[[400.0, 150, 400], [400, 450, 600], [300, 225, 300]]])
    assignment, status = solve(cost)
    assert status[0] == OK and assignment[0].tolist() == [1, 0, 2]  # total 850, the unique optimum
    cost = torch.tensor([[[10.0, 10, 8, 11], [9, 8, 1, 1], [9, 7, 4, 10]]])
    assignment, status = solve(cost)
    assert cost[0, [0, 1, 2], assignment[0]].sum().item() == 15.0


@pytest.mark.parametrize("rows,cols", [(10, 10), (8, 20), (20, 8), (37, 37)])
def test_forbidden_pairs_feasible_and_infeasible(isa, generator, rows, cols):
    cost = torch.rand(24, rows, cols, generator=generator, dtype=torch.float64)
    forbidden = torch.rand(24, rows, cols, generator=generator) < torch.linspace(0.05, 0.97, 24).view(24, 1, 1)
    cost[forbidden] = float("inf")
    assignment, status = solve(cost, num_threads=2)
    check_against_scipy(cost, assignment, status)
    assert (status == OK).any() and (status == INFEASIBLE).any()  # the sweep covers both outcomes


def test_infeasible_patterns(isa):
    cost = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    cost[0, :, 0] = float("inf")  # a column nobody may take (square)
    cost[1, 1, :] = float("inf")  # a row that may take nothing
    cost[2, :2, 1:] = float("inf")  # rows 0 and 1 compete for column 0
    assignment, status = solve(cost)
    assert status.tolist() == [INFEASIBLE] * 3 and (assignment == -1).all()
    wide = torch.full((1, 3, 6), float("inf"))
    wide[0, :, 2] = 1.0  # three rows, one admissible column
    assignment, status = solve(wide)
    assert status[0] == INFEASIBLE and (assignment == -1).all()


@pytest.mark.parametrize("maximize", [False, True])
def test_invalid_entries_set_status_per_problem(isa, generator, maximize):
    cost = torch.rand(5, 6, 9, generator=generator)
    cost[1, 2, 3] = float("nan")
    cost[2, 5, 8] = float("inf") if maximize else float("-inf")  # invalid after the sign flip
    cost[3, 0, 0] = float("-inf") if maximize else float("inf")  # a forbidden pair: fine
    cost[4, 1, :] = float("-inf") if maximize else float("inf")  # an all-forbidden row ...
    cost[4, 3, 3] = float("nan")  # ... but the invalid entry decides
    assignment, status = solve(cost, maximize=maximize)
    assert status.tolist() == [OK, INVALID, INVALID, OK, INVALID]
    assert (assignment[[1, 2, 4]] == -1).all()
    check_against_scipy(cost[[0, 3]], assignment[[0, 3]], status[[0, 3]], maximize=maximize)


@pytest.mark.parametrize("transpose", [False, True])
def test_ragged_extents_ignore_entries_outside_the_block(isa, generator, transpose):
    batch, rows, cols = 12, 15, 11
    cost = torch.rand(batch, rows, cols, generator=generator)
    num_rows = torch.randint(0, rows + 1, (batch,), generator=generator).numpy()
    num_cols = torch.randint(0, cols + 1, (batch,), generator=generator).numpy()
    num_rows[:3] = [0, rows, 4]
    num_cols[:3] = [cols, 0, cols]
    for b in range(batch):  # entries outside the block would make it invalid
        cost[b, num_rows[b]:, :] = float("nan")
        cost[b, :, num_cols[b]:] = float("nan")
    if transpose:  # the same problems, stored column-major
        cost = cost.transpose(1, 2).contiguous().transpose(1, 2)
    assignment, status = solve(cost, num_rows, num_cols, num_threads=3)
    check_against_scipy(cost, assignment, status, num_rows, num_cols)
    assert (assignment[0] == -1).all() and (assignment[1] == -1).all() and status[0] == status[1] == OK


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,cols", [(9, 9), (6, 23), (23, 6)])
def test_other_element_types(isa, generator, dtype, rows, cols):
    cost = (torch.rand(6, rows, cols, generator=generator) * 8 - 2).to(dtype)
    cost[0, 0, :3] = float("inf")
    check_against_scipy(cost, *solve(cost))
    negated = -cost  # +inf becomes -inf: a forbidden pair when maximising
    check_against_scipy(negated, *solve(negated, maximize=True), maximize=True)


def test_float16_special_values(isa, generator):
    tiny = 2.0**-24  # the smallest float16 subnormal
    cost = (torch.randint(0, 1000, (4, 7, 7), generator=generator).to(torch.float64) * tiny).to(torch.float16)
    cost[1] = (torch.randint(0, 40, (7, 7), generator=generator) * 32 + 64000).to(torch.float16)  # near the maximum
    cost[2, 2, :3] = float("inf")
    cost[3, 4, 4] = float("nan")
    assert (cost[0].double() < 2.0**-14).any()  # subnormal values are present
    assignment, status = solve(cost)
    check_against_scipy(cost, assignment, status)
    assert status.tolist() == [OK, OK, OK, INVALID]


def test_non_contiguous_views(isa, generator):
    base = torch.rand(4, 30, 40, generator=generator)
    views = {
        "transposed": base.transpose(1, 2),  # stride_row == 1
        "strided columns": base[:, :, ::3],  # stride_col == 3
        "strided rows and batch": base[::2, ::2, :],
        "shared matrix": base[0].expand(5, 30, 40),  # stride_batch == 0
        "column-major square": base[:, :30, :30].transpose(1, 2),
    }
    for name, view in views.items():
        assignment, status = solve(view)
        check_against_scipy(view, assignment, status)
        contiguous, contiguous_status = solve(view.contiguous())
        assert (assignment == contiguous).all() and (status == contiguous_status).all(), name


def test_results_do_not_depend_on_thread_count(isa, generator):
    cost = torch.rand(9, 25, 40, generator=generator)
    cost[2, 3, 4] = float("nan")
    num_rows = np.array([25, 0, 25, 10, 25, 25, 3, 25, 25])
    reference, reference_status = solve(cost, num_rows=num_rows, num_threads=1)
    check_against_scipy(cost, reference, reference_status, num_rows=num_rows)
    for threads in (2, 5, 64):
        assignment, status = solve(cost, num_rows=num_rows, num_threads=threads)
        assert (assignment == reference).all() and (status == reference_status).all()


def test_concurrent_callers(generator):
    costs = [torch.rand(16, 20, 30, generator=generator) for _ in range(4)]
    expected = [solve(c)[0] for c in costs]
    results = [None] * len(costs)

    def worker(k):
        for _ in range(5):
            results[k] = solve(costs[k], num_threads=2)[0]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(costs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all((r == e).all() for r, e in zip(results, expected))


def _solve_in_child(queue):
    cost = torch.rand(8, 12, 20)
    assignment, status = solve(cost, num_threads=3)
    totals = [float(cost[b, np.flatnonzero(assignment[b] >= 0), assignment[b][assignment[b] >= 0]].sum())
              for b in range(8)]
    expected = [float(cost[b].double().numpy()[scipy_lsap(cost[b].double().numpy())].sum()) for b in range(8)]
    queue.put(bool((status == OK).all()) and np.allclose(totals, expected, rtol=1e-6))


def test_worker_threads_after_fork(generator):
    solve(torch.rand(8, 12, 20, generator=generator), num_threads=3)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_solve_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or crashed"
    assert queue.get(timeout=5)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    values=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.5, -1.0, float("inf")]), min_size=144, max_size=144),
    maximize=st.booleans(),
)
def test_small_problems_with_ties_and_forbidden_pairs(rows, cols, values, maximize):
    cost = torch.tensor(values, dtype=torch.float64)[: rows * cols].view(1, rows, cols)
    if maximize:
        cost = -cost  # keep +inf as the forbidden value after the sign flip
    check_against_scipy(cost, *solve(cost, maximize=maximize), maximize=maximize)


def test_empty_batches_and_extents():
    for shape in [(0, 4, 5), (3, 0, 5), (3, 4, 0)]:
        cost = torch.rand(shape)
        assignment, status = solve(cost)
        assert assignment.shape == shape[:2] and (assignment == -1).all() and (status == OK).all()
    _C.lsap_cpu(0, "float32", 2, 3, 3, 9, 3, 1, np.zeros(2, np.int64).ctypes.data, 0, False,
                np.empty((2, 3), np.int64).ctypes.data, np.empty(2, np.int32).ctypes.data, 1)


def test_argument_validation():
    cost = torch.rand(2, 3, 4)
    out = np.empty((2, 3), np.int64)
    status = np.empty(2, np.int32)
    good = dict(cost_ptr=cost.data_ptr(), dtype="float32", batch=2, rows=3, cols=4, stride_batch=12, stride_row=4,
                stride_col=1, num_rows_ptr=0, num_cols_ptr=0, maximize=False, out_ptr=out.ctypes.data,
                status_ptr=status.ctypes.data, num_threads=1)
    _C.lsap_cpu(**good)
    too_many = np.array([1, 4], np.int64)
    negative = np.array([-1, 2], np.int64)
    bad = {
        "dtype": dict(dtype="int32"),
        "batch": dict(batch=-1),
        "rows": dict(rows=-2),
        "stride": dict(stride_row=-4),
        "num_threads": dict(num_threads=0),
        "num_rows": dict(num_rows_ptr=too_many.ctypes.data),
        "num_cols": dict(num_cols_ptr=negative.ctypes.data),
        "cost_ptr": dict(cost_ptr=0),
        "out_ptr": dict(out_ptr=0),
        "status_ptr": dict(status_ptr=0),
    }
    for name, change in bad.items():
        with pytest.raises(ValueError, match=name.split("_ptr")[0] if name != "stride" else "strides"):
            _C.lsap_cpu(**{**good, **change})
    with pytest.raises(TypeError):
        _C.lsap_cpu(**{**good, "batch": "two"})
