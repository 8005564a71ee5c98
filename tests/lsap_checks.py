"""Assertions shared by the solver tests: an assignment is valid and as good as scipy's."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsap


def assert_optimal(cost: torch.Tensor, assignment: torch.Tensor, num_rows=None, num_cols=None, maximize=False):
    """``assignment`` ([B, N], -1 = unassigned) is a complete, valid and optimal assignment
    of each problem's top-left block, compared with scipy in float64. Every entry is either a
    column of the block or exactly -1."""
    matrices = cost.detach().double().cpu().numpy()
    assert assignment.dtype == torch.int64 and assignment.shape == cost.shape[:2], (assignment.dtype, assignment.shape)
    assignment = assignment.cpu().numpy()
    batch, rows, cols = matrices.shape
    for index in range(batch):
        n = rows if num_rows is None else int(num_rows[index])
        m = cols if num_cols is None else int(num_cols[index])
        block = matrices[index, :n, :m]
        chosen = assignment[index]
        assert (chosen[n:] == -1).all(), f"problem {index}: rows beyond num_rows were assigned"
        # An unmatched row is exactly -1: no other negative value, and no column beyond the matrix.
        assert ((chosen == -1) | ((chosen >= 0) & (chosen < cols))).all(), f"problem {index}: entries {chosen}"
        matched_rows = np.flatnonzero(chosen[:n] >= 0)
        matched_cols = chosen[matched_rows]
        assert len(matched_rows) == min(n, m), f"problem {index}: {len(matched_rows)} matches, expected {min(n, m)}"
        assert (matched_cols < m).all(), f"problem {index}: column beyond num_cols"
        assert len(set(matched_cols.tolist())) == len(matched_cols), f"problem {index}: a column used twice"
        if n == 0 or m == 0:
            continue
        total = block[matched_rows, matched_cols].sum()
        expected_rows, expected_cols = scipy_lsap(block, maximize=maximize)
        expected = block[expected_rows, expected_cols].sum()
        assert np.isfinite(total), f"problem {index}: a forbidden pair was used"
        assert np.isclose(total, expected, rtol=1e-9, atol=1e-9), f"problem {index}: total {total} != scipy {expected}"
