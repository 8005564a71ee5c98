"""Plain reference for the batched solver: scipy, called once per problem.

This is the oracle of the tests and the ``scipy`` matcher backend's building block.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fastvlp.ops.lsap import check_batched_problem, check_extent_values


def batched_linear_sum_assignment_reference(
    cost: torch.Tensor,
    num_rows: Optional[torch.Tensor] = None,
    num_cols: Optional[torch.Tensor] = None,
    maximize: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`fastvlp.ops.batched_linear_sum_assignment` (with
    ``check_finite=True``), solved by ``scipy.optimize.linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment as scipy_lsap

    num_rows, num_cols = check_batched_problem(cost, num_rows, num_cols)
    batch, rows, cols = cost.shape
    check_extent_values(num_rows, num_cols, rows, cols)
    matrices = cost.detach().to("cpu", torch.float64).numpy()
    row_counts = [rows] * batch if num_rows is None else [int(n) for n in num_rows.tolist()]
    col_counts = [cols] * batch if num_cols is None else [int(m) for m in num_cols.tolist()]
    assignment = np.full((batch, rows), -1, dtype=np.int64)
    for index in range(batch):
        block = matrices[index, : row_counts[index], : col_counts[index]]
        try:
            row_ind, col_ind = scipy_lsap(block, maximize=maximize)
        except ValueError as error:
            raise ValueError(f"{error} (problem {index})") from None
        assignment[index, row_ind] = col_ind
    return torch.from_numpy(assignment).to(cost.device)
