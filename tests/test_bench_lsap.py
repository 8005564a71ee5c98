"""`fastvlp bench lsap` bookkeeping on the CPU: the matcher rows time the configuration the model runs,
label ``check_finite`` on every row, take fresh inputs per call, and a wrong solver is never ranked."""
import inspect

import numpy as np
import pytest
import torch

from fastvlp.bench import lsap
from fastvlp.models import E2EVLP, get_preset
from fastvlp.nn.matcher import HungarianMatcher


def test_matcher_rows_time_the_models_setting_and_label_both(monkeypatch):
    made = []
    real_outputs = lsap._detr_outputs

    def counted_outputs(*args, **kwargs):
        made.append(kwargs.get("seed", args[-1]))
        return real_outputs(*args, **kwargs)

    monkeypatch.setattr(lsap, "_detr_outputs", counted_outputs)
    rows = lsap.run_matcher(batch=2, queries=6, classes=4, max_targets=3, repeats=2, warmup=1, progress=False,
                            device="cpu")
    assert len(set(made)) == 3  # a fresh pool entry for each of the warm-up and timed calls
    by_contender = {}
    for row in rows:
        by_contender.setdefault(row["contender"], []).append(row)
        assert len(row["raw_ms"]) == 2 and row["median_ms"] > 0
    assert sorted(by_contender) == ["matcher-detr-host-scipy", "matcher-fastvlp", "matcher-fastvlp-unchecked"]
    assert {row["name"] for row in by_contender["matcher-fastvlp"]} == {"matcher-call", "matcher-six-layer-step"}
    # The plainly named row is the matcher as the model builds it: the default check_finite.
    default = inspect.signature(HungarianMatcher).parameters["check_finite"].default
    model_setting = E2EVLP(get_preset("tiny")).criterion.matcher.check_finite
    assert all(row["check_finite"] is default is model_setting for row in by_contender["matcher-fastvlp"])
    assert all(row["check_finite"] is False for row in by_contender["matcher-fastvlp-unchecked"])
    assert all(row["check_finite"] is None for row in by_contender["matcher-detr-host-scipy"])


def test_gpu_solver_rows_include_the_checked_default_and_the_unchecked_variant():
    contenders = lsap._gpu_contenders()
    assert lsap.GPU_CHECK_FINITE == {"fastvlp-cuda": True, "fastvlp-cuda-unchecked": False}
    cost = torch.rand(2, 4, 3, generator=torch.Generator().manual_seed(0))
    # Both solve (here on the CPU, where the same callables run), and only the default one checks.
    assert torch.equal(contenders["fastvlp-cuda"](cost), contenders["fastvlp-cuda-unchecked"](cost))
    bad = cost.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        contenders["fastvlp-cuda"](bad)
    contenders["fastvlp-cuda-unchecked"](bad)


def test_assignment_check_rejects_duplicates_short_matchings_and_worse_costs():
    batch = np.random.default_rng(3).random((2, 4, 3), dtype=np.float32)
    from scipy.optimize import linear_sum_assignment

    best = np.full((2, 4), -1)
    for index, matrix in enumerate(batch):
        rows, cols = linear_sum_assignment(matrix)
        best[index, rows] = cols
    assert lsap.assignment_is_optimal(batch, best)
    duplicate = best.copy()
    matched = np.flatnonzero(duplicate[0] >= 0)
    duplicate[0, matched[1]] = duplicate[0, matched[0]]
    assert not lsap.assignment_is_optimal(batch, duplicate)
    short = best.copy()
    short[0, matched[0]] = -1
    assert not lsap.assignment_is_optimal(batch, short)
    swapped = best.copy()
    swapped[0, matched[0]], swapped[0, matched[1]] = best[0, matched[1]], best[0, matched[0]]
    assert not lsap.assignment_is_optimal(batch, swapped)  # a valid matching, but not the cheapest


def test_a_wrong_fastvlp_variant_is_flagged_left_out_and_fails_the_cli(monkeypatch, tmp_path):
    real = lsap._cpu_contenders

    def with_a_wrong_variant(max_threads):
        contenders = {name: solve for name, solve in real(max_threads).items() if name in ("scipy-loop", "fastvlp-1t")}
        contenders["fastvlp-2t"] = lambda batch: torch.full(batch.shape[:2], -1, dtype=torch.int64)
        return contenders

    monkeypatch.setattr(lsap, "_cpu_contenders", with_a_wrong_variant)
    rows = lsap.run_cpu(shapes=((2, 5, 3),), repeats=1, warmup=0, progress=False)
    by_name = {row["contender"]: row for row in rows}
    assert by_name["fastvlp-1t"]["optimal"] is True and "status" not in by_name["fastvlp-1t"]
    assert by_name["fastvlp-2t"]["optimal"] is False and by_name["fastvlp-2t"]["status"].startswith("wrong result")
    summary = lsap.speedup_summary(rows).splitlines()[1]
    assert summary.split()[-1] == "-"  # no ratio for the wrong variant
    assert lsap.main(["--device", "cpu", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]) == 1
