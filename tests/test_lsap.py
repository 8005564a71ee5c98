"""fastvlp.ops.batched_linear_sum_assignment and linear_sum_assignment against scipy."""
import numpy as np
import pytest
import torch
from lsap_checks import assert_optimal
from scipy.optimize import linear_sum_assignment as scipy_lsap

from fastvlp.ops import batched_linear_sum_assignment, batched_linear_sum_assignment_reference, linear_sum_assignment

# The public API on both devices: the CUDA solver must raise, leave -1 rows and honour extents as the CPU one does.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

SHAPES = [(5, 7, 7), (4, 10, 3), (4, 3, 10), (3, 1, 9), (3, 9, 1), (2, 100, 20), (2, 20, 100), (2, 60, 60)]


@pytest.fixture
def generator(fresh_seed):
    return torch.Generator().manual_seed(fresh_seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_threads", [1, 3])
def test_random_matches_scipy(shape, num_threads, generator):
    cost = torch.rand(shape, generator=generator, dtype=torch.float64) * 10 - 3
    assert_optimal(cost, batched_linear_sum_assignment(cost, num_threads=num_threads))


@pytest.mark.parametrize("shape", [(6, 8, 8), (6, 12, 5), (6, 5, 12)])
def test_tie_heavy_matches_scipy(shape, generator):
    cost = torch.randint(0, 3, shape, generator=generator).float()
    assert_optimal(cost, batched_linear_sum_assignment(cost))


@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 4, 9), (2, 9, 4)])
def test_constant_matrix(shape):
    cost = torch.full(shape, 2.5)
    assignment = batched_linear_sum_assignment(cost)
    assert_optimal(cost, assignment)
    if shape[1] == shape[2]:  # scipy gives the identity on a square constant matrix
        assert torch.equal(assignment, torch.arange(shape[1]).expand(shape[0], -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype(dtype, generator):
    cost = (torch.rand(4, 30, 12, generator=generator) * 4).to(dtype)
    assert_optimal(cost, batched_linear_sum_assignment(cost))


def test_non_contiguous_and_expanded(generator):
    base = torch.rand(3, 12, 17, generator=generator, dtype=torch.float64)
    transposed = base.transpose(1, 2)
    assert not transposed.is_contiguous()
    assert_optimal(transposed, batched_linear_sum_assignment(transposed))
    sliced = base[:, ::2, 1::2]
    assert_optimal(sliced, batched_linear_sum_assignment(sliced))
    expanded = base[:1].expand(4, -1, -1)
    result = batched_linear_sum_assignment(expanded)
    assert_optimal(expanded, result)
    assert all(torch.equal(result[0], row) for row in result)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 9, 13), (5, 13, 9)])
def test_maximize(shape, device, generator):
    cost = torch.rand(shape, generator=generator, dtype=torch.float64).to(device)
    result = batched_linear_sum_assignment(cost, maximize=True)
    assert result.device == cost.device
    assert_optimal(cost, result, maximize=True)
    # maximize negates first: -inf is then a forbidden pair
    cost[:, 0, 0] = float("-inf")
    cost[:, 2, :4] = float("-inf")
    result = batched_linear_sum_assignment(cost, maximize=True)
    assert (result[:, 0] != 0).all()
    assert ((result[:, 2] == -1) | (result[:, 2] >= 4)).all()  # a tall problem may leave row 2 unmatched
    # scipy maximising the same matrix treats -inf as forbidden too (assert_optimal checks a finite total)
    assert_optimal(cost, result, maximize=True)


def test_forbidden_pairs_feasible(generator):
    cost = torch.rand(6, 8, 8, generator=generator, dtype=torch.float64)
    forbidden = torch.rand(6, 8, 8, generator=generator) < 0.5
    # keep a permutation allowed in each problem so that it stays feasible
    perm = torch.stack([torch.randperm(8, generator=generator) for _ in range(6)])
    forbidden[torch.arange(6)[:, None], torch.arange(8)[None, :], perm] = False
    cost[forbidden] = float("inf")
    result = batched_linear_sum_assignment(cost)
    assert_optimal(cost, result)
    chosen = cost.gather(2, result.unsqueeze(-1))
    assert torch.isfinite(chosen).all()


@pytest.mark.parametrize("device", DEVICES)
def test_infeasible_names_first_bad_problem(device, generator):
    cost = torch.rand(5, 4, 4, generator=generator)
    cost[3, :, 0] = float("inf")
    cost[3, :, 1] = float("inf")
    cost[3, :, 2] = float("inf")  # 4 rows, 1 allowed column
    cost[4, :, :3] = float("inf")
    cost = cost.to(device)
    with pytest.raises(ValueError, match=r"cost matrix is infeasible \(problem 3\)"):
        batched_linear_sum_assignment(cost)
    result = batched_linear_sum_assignment(cost, check_finite=False)
    assert result.device == cost.device and result.shape == (5, 4)
    assert (result[3] == -1).all() and (result[4] == -1).all()
    assert_optimal(cost[:3], result[:3])
    # A lone infeasible problem is named by its own index.
    with pytest.raises(ValueError, match=r"cost matrix is infeasible \(problem 1\)"):
        batched_linear_sum_assignment(cost[[0, 4, 1]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_invalid_entries(bad, device, generator):
    cost = torch.rand(4, 6, 5, generator=generator)
    cost[2, 1, 3] = bad
    cost[3, 0, 0] = bad
    cost[3, 2, :] = float("inf")  # invalid entries are reported before infeasibility
    cost[3, 3, :] = float("inf")
    cost = cost.to(device)
    with pytest.raises(ValueError, match=r"matrix contains invalid numeric entries \(problem 2\)"):
        batched_linear_sum_assignment(cost)
    result = batched_linear_sum_assignment(cost, check_finite=False)
    assert result.device == cost.device
    assert (result[2:] == -1).all()
    assert_optimal(cost[:2], result[:2])
    with pytest.raises(ValueError, match=r"matrix contains invalid numeric entries \(problem 0\)"):
        batched_linear_sum_assignment(cost[3:])


def test_plus_inf_invalid_when_maximizing(generator):
    cost = torch.rand(2, 3, 3, generator=generator)
    cost[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"invalid numeric entries \(problem 1\)"):
        batched_linear_sum_assignment(cost, maximize=True)


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_extents(device, generator):
    cost = torch.rand(6, 10, 8, generator=generator, dtype=torch.float64)
    # entries outside each problem's extent must be ignored, even NaN
    num_rows = torch.tensor([10, 0, 4, 7, 10, 3])
    num_cols = torch.tensor([8, 5, 0, 8, 2, 8], dtype=torch.int32)
    for index in range(6):
        cost[index, int(num_rows[index]):, :] = float("nan")
        cost[index, :, int(num_cols[index]):] = float("nan")
    cost = cost.to(device)
    # Extents on the cost's device, and on the CPU for a CUDA cost (they are moved to it).
    for rows_extent, cols_extent in [(num_rows.to(device), num_cols.to(device)), (num_rows, num_cols)]:
        result = batched_linear_sum_assignment(cost, num_rows=rows_extent, num_cols=cols_extent)
        assert result.device == cost.device
        assert (result[1] == -1).all() and (result[2] == -1).all()
        assert_optimal(cost, result, num_rows, num_cols)
        unchecked = batched_linear_sum_assignment(cost, num_rows=rows_extent, num_cols=cols_extent,
                                                  check_finite=False)
        assert_optimal(cost, unchecked, num_rows, num_cols)
    # The padding is NaN: without the extents the full matrices are invalid.
    with pytest.raises(ValueError, match=r"invalid numeric entries \(problem 1\)"):
        batched_linear_sum_assignment(cost)
    reference = batched_linear_sum_assignment_reference(cost, num_rows, num_cols)
    assert reference.device == cost.device
    assert_optimal(cost, reference, num_rows, num_cols)


@pytest.mark.parametrize("device", DEVICES)
def test_extents_outside_their_range_are_clamped_without_check_finite(device, generator):
    """Documented: with check_finite=False an extent is clamped to [0, N] / [0, M], so a negative one
    gives an empty problem (all -1) and one above N or M the full extent; check_finite=True raises."""
    cost = (torch.rand(5, 6, 4, generator=generator, dtype=torch.float64) * 10 - 3).to(device)
    num_rows = torch.tensor([9, -3, 2, 6, 2**40])
    num_cols = torch.tensor([4, 4, 2**62, -1, 3])
    clamped_rows, clamped_cols = torch.tensor([6, 0, 2, 6, 6]), torch.tensor([4, 4, 4, 0, 3])
    with pytest.raises(ValueError, match=r"num_rows must lie in \[0, 6\]"):
        batched_linear_sum_assignment(cost, num_rows, num_cols)
    with pytest.raises(ValueError, match=r"num_cols must lie in \[0, 4\]"):
        batched_linear_sum_assignment(cost, clamped_rows, num_cols)
    result = batched_linear_sum_assignment(cost, num_rows, num_cols, check_finite=False)
    assert (result[1] == -1).all() and (result[3] == -1).all()  # negative extents: empty problems
    assert_optimal(cost, result, clamped_rows, clamped_cols)  # scipy on the clamped blocks
    expected = batched_linear_sum_assignment(cost, clamped_rows, clamped_cols)
    assert torch.equal(result, expected)
    # A NaN outside the clamped block is never read: clamping does not widen a problem beyond [N, M].
    cost[2, 2:, :] = float("nan")
    result = batched_linear_sum_assignment(cost, num_rows, num_cols, check_finite=False)
    assert (result[2, :2] >= 0).all() and (result[2, 2:] == -1).all()
    assert_optimal(cost[2:3], result[2:3], clamped_rows[2:3], clamped_cols[2:3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("check_finite", [True, False])
def test_empty_batch_and_shapes(device, check_finite, generator):
    for shape in [(0, 4, 4), (0, 0, 0), (3, 0, 4), (3, 0, 0), (3, 4, 0)]:
        cost = torch.rand(shape, generator=generator).to(device)
        result = batched_linear_sum_assignment(cost, check_finite=check_finite)
        assert result.shape == shape[:2] and result.dtype == torch.int64 and result.device == cost.device
        assert (result == -1).all()
    # Empty problems (zero extents) inside a batch of non-empty ones: their rows are -1, the others optimal.
    cost = torch.rand(4, 5, 6, generator=generator).to(device)
    num_rows, num_cols = torch.tensor([5, 0, 3, 5]), torch.tensor([6, 4, 0, 2])
    result = batched_linear_sum_assignment(cost, num_rows, num_cols, check_finite=check_finite)
    assert (result[1] == -1).all() and (result[2] == -1).all()
    assert_optimal(cost, result, num_rows, num_cols)


@pytest.mark.parametrize("shape", [(4, 12, 12), (4, 5, 12), (4, 12, 5)])
@pytest.mark.parametrize("maximize", [False, True])
def test_costs_near_the_documented_magnitude_limit(shape, maximize, generator):
    """The docstring allows finite entries up to about 1e307 in magnitude (float64 duals); at that scale,
    with both signs and with exact ties, the totals still match scipy's."""
    scale = 1e307  # 12 entries of this size still sum to a finite float64 (< 1.8e308)
    cost = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
    assert cost.abs().max() > scale / 2
    assert_optimal(cost, batched_linear_sum_assignment(cost, maximize=maximize), maximize=maximize)
    ties = torch.randint(-3, 4, shape, generator=generator).double() / 3 * scale
    ties[0, 0, :2] = float("-inf") if maximize else float("inf")  # two forbidden pairs
    assert_optimal(ties, batched_linear_sum_assignment(ties, maximize=maximize), maximize=maximize)
    matrix = cost[1].numpy()
    rows, cols = linear_sum_assignment(matrix, maximize=maximize)
    expected_rows, expected_cols = scipy_lsap(matrix, maximize=maximize)
    np.testing.assert_allclose(matrix[rows, cols].sum(), matrix[expected_rows, expected_cols].sum(), rtol=1e-9)
    # float32 near its own largest finite value (3.4e38): the float64 duals have room to spare.
    single = (torch.rand(shape, generator=generator) * 2 - 1) * 3e38
    assert_optimal(single, batched_linear_sum_assignment(single, maximize=maximize), maximize=maximize)


def test_num_threads_above_cores(generator):
    cost = torch.rand(16, 30, 20, generator=generator, dtype=torch.float64)
    assert torch.equal(batched_linear_sum_assignment(cost, num_threads=1), batched_linear_sum_assignment(cost, num_threads=9))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"cost": [[1.0]]}, TypeError, "cost must be a torch.Tensor"),
        ({"cost": torch.rand(3, 3)}, ValueError, r"cost must have shape \[B, N, M\]"),
        ({"cost": torch.ones(2, 3, 3, dtype=torch.int64)}, TypeError, "cost must be float16"),
        ({"cost": torch.rand(2, 3, 3), "num_rows": torch.tensor([1, 2, 3])}, ValueError, "num_rows must have shape"),
        ({"cost": torch.rand(2, 3, 3), "num_cols": torch.tensor([1.0, 2.0])}, TypeError, "num_cols must be an integer"),
        ({"cost": torch.rand(2, 3, 3), "num_cols": torch.tensor([1, 4])}, ValueError, r"num_cols must lie in \[0, 3\]"),
        ({"cost": torch.rand(2, 3, 3), "num_rows": torch.tensor([-1, 2])}, ValueError, "num_rows must lie"),
        ({"cost": torch.rand(2, 3, 3), "num_threads": 0}, ValueError, "num_threads must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        batched_linear_sum_assignment(**kwargs)
    # The reference keeps the same contract, so a test that compares the two never feeds it a wrong block.
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "num_threads"}
    if len(reference_kwargs) == len(kwargs):
        with pytest.raises(error, match=message):
            batched_linear_sum_assignment_reference(**reference_kwargs)


def test_lazily_negated_costs_are_read_with_their_sign(generator):
    values = torch.rand(3, 5, 5, generator=generator, dtype=torch.float64)
    negated = torch.complex(torch.zeros_like(values), values).conj().imag  # a view whose negation is lazy
    assert negated.is_neg()
    assert_optimal(-values, batched_linear_sum_assignment(negated))
    assert_optimal(-values[:1], linear_sum_assignment(negated[0])[1][None])


def test_num_threads_takes_any_integer(generator):
    cost = torch.rand(4, 6, 6, generator=generator)
    expected = batched_linear_sum_assignment(cost, num_threads=2)
    assert torch.equal(batched_linear_sum_assignment(cost, num_threads=np.int64(2)), expected)


# --- the scipy drop-in -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 6), (3, 8), (8, 3), (1, 1)])
def test_drop_in_matches_scipy_exactly(shape, fresh_seed):
    matrix = np.random.default_rng(fresh_seed).random(shape)
    rows, cols = linear_sum_assignment(matrix)
    expected_rows, expected_cols = scipy_lsap(matrix)
    assert isinstance(rows, np.ndarray) and rows.dtype == expected_rows.dtype
    np.testing.assert_array_equal(rows, np.sort(rows))
    np.testing.assert_allclose(matrix[rows, cols].sum(), matrix[expected_rows, expected_cols].sum(), rtol=1e-12)


def test_drop_in_kinds(fresh_seed):
    matrix = np.random.default_rng(fresh_seed).random((4, 6)).astype(np.float32)
    from_list = linear_sum_assignment(matrix.tolist())
    assert isinstance(from_list[0], np.ndarray)
    tensor_rows, tensor_cols = linear_sum_assignment(torch.from_numpy(matrix))
    assert isinstance(tensor_rows, torch.Tensor) and tensor_rows.dtype == torch.int64
    np.testing.assert_array_equal(tensor_rows.numpy(), linear_sum_assignment(matrix)[0])
    np.testing.assert_array_equal(tensor_cols.numpy(), linear_sum_assignment(matrix)[1])
    int_rows, _ = linear_sum_assignment(torch.tensor([[3, 1], [1, 3]]))
    assert int_rows.tolist() == [0, 1]


def test_drop_in_errors(fresh_seed):
    with pytest.raises(ValueError, match="expected a matrix"):
        linear_sum_assignment(torch.rand(3))
    with pytest.raises(ValueError, match="^matrix contains invalid numeric entries$"):
        linear_sum_assignment(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="^cost matrix is infeasible$"):
        linear_sum_assignment(np.array([[np.inf, np.inf], [1.0, 2.0]]))
    with pytest.raises(TypeError, match="Cannot cast array data"):
        linear_sum_assignment(np.array([[1 + 2j]]))
    negative_strides = np.random.default_rng(fresh_seed).random((5, 4))[::-1, ::-1]
    rows, cols = linear_sum_assignment(negative_strides)
    expected = scipy_lsap(negative_strides)
    assert np.isclose(negative_strides[rows, cols].sum(), negative_strides[expected].sum())


def outcome(function, cost_matrix):
    """Result or (error type, message) of a drop-in call, for comparing with scipy."""
    try:
        rows, cols = function(cost_matrix)
    except (ValueError, TypeError, OverflowError) as error:
        return type(error), str(error)
    return "ok", np.asarray(rows).tolist(), np.asarray(cols).tolist(), np.asarray(rows).dtype, np.asarray(cols).dtype


def test_drop_in_converts_other_input_to_float64_as_scipy_does():
    rng = np.random.default_rng(7)
    with_none = rng.random((4, 5)).tolist()
    with_none[int(rng.integers(4))][int(rng.integers(5))] = None
    numeric_strings = [[str(value) for value in row] for row in rng.integers(0, 9, (3, 3)).tolist()]
    cases = [
        [[1.0, None], [1, 2]],  # an object array to numpy: scipy reads None as NaN
        with_none,
        [[None, None]],
        numeric_strings,
        [[1, "x"], [3, 4]],
        [[1 + 0j, 2], [3, 4]],
        [[1, 2**70], [3, 4]],
        [[1, 2**2000], [3, 4]],
        [[1, 2], [3]],
        [[np.longdouble(1), 2], [3, 4]],
        ((1, 2), (3, 4)),
        (rng.random((3, 6)) * 10 - 5).tolist(),
        # Arrays and buffers keep their dtype and are cast by the safe rule.
        np.array([[1, None], [1, 2]], dtype=object),
        memoryview(np.array([[1, 2], [3, 4]], dtype=np.longdouble)),
        memoryview(rng.random((3, 2))),
        # Not matrices: scipy names the number of dimensions.
        [], 1.0, [1, 2], [[[1.0]]], "ab", b"ab",
    ]
    for case in cases:
        assert outcome(linear_sum_assignment, case) == outcome(scipy_lsap, case), repr(case)
    with pytest.raises(ValueError, match="^matrix contains invalid numeric entries$"):
        linear_sum_assignment([[1.0, None], [1, 2]])
    with pytest.raises(ValueError, match=r"expected a matrix \(2-D array\), got a 3 array"):
        linear_sum_assignment(torch.rand(1, 2, 2))


# --- torch.library registration ----------------------------------------------------------------


def test_opcheck(generator):
    cost = torch.rand(3, 7, 5, generator=generator)
    torch.library.opcheck(torch.ops.fastvlp.batched_linear_sum_assignment.default, (cost, None, None, False, 1, True))
    extents = (torch.tensor([7, 2, 0]), torch.tensor([5, 5, 3]))
    torch.library.opcheck(torch.ops.fastvlp.batched_linear_sum_assignment.default, (cost, *extents, True, 2, True))


def test_compiled_loss_fullgraph(generator):
    def matched_cost(cost):
        assignment = batched_linear_sum_assignment(cost)
        chosen = cost.gather(2, assignment.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (chosen * (assignment >= 0)).sum()

    cost = torch.rand(4, 9, 6, generator=generator)
    compiled = torch.compile(matched_cost, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cost), matched_cost(cost))
