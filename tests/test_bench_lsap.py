"""`fastvlp bench lsap` bookkeeping on the CPU: the matcher rows time the configuration the model runs,
label ``check_finite`` on every row, take fresh inputs per call, and a wrong solver is never ranked."""
import argparse
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


def test_a_wrong_solver_on_any_device_gets_a_wrong_result_status():
    batch = np.random.default_rng(5).random((2, 5, 3), dtype=np.float32)
    cost = torch.from_numpy(batch)
    right = lsap._gpu_contenders()["fastvlp-cuda"]  # the same callable solves CPU tensors
    assert lsap.check_solver(right, cost) == {"optimal": True}
    unmatched = lambda cost: torch.full(cost.shape[:2], -1, dtype=torch.int64)  # noqa: E731
    assert lsap.check_solver(unmatched, cost) == {"optimal": False, "status": lsap.WRONG_RESULT}
    assert lsap.check_solver(unmatched, batch)["optimal"] is False  # a numpy batch, as on the CPU


class BackwardMatcher:
    """A matcher's matches with each image's targets paired backwards: a valid matching, but a costlier one."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.cost_class, self.cost_bbox, self.cost_giou = matcher.cost_class, matcher.cost_bbox, matcher.cost_giou

    def __call__(self, outputs, targets):
        return [(rows, cols.flip(0)) for rows, cols in self.matcher(outputs, targets)]


def test_a_matcher_whose_matches_are_not_optimal_is_flagged():
    matcher = HungarianMatcher(1, 5, 2, backend="fastvlp")
    outputs, targets = lsap._detr_outputs(2, 6, 4, 3, 2, torch.device("cpu"), seed=1)
    assert any(len(target["labels"]) > 1 for target in targets)  # an image whose pairs can be swapped
    assert lsap.check_matcher(matcher, outputs, targets) == {"optimal": True}
    assert lsap.check_matcher(BackwardMatcher(matcher), outputs, targets) == {"optimal": False,
                                                                               "status": lsap.WRONG_RESULT}


def test_matcher_rows_carry_the_check_and_a_failed_check_marks_both(monkeypatch):
    real = lsap.check_matcher
    monkeypatch.setattr(lsap, "check_matcher", lambda matcher, outputs, targets: (
        {"optimal": False, "status": lsap.WRONG_RESULT} if matcher.check_finite is False else real(matcher, outputs, targets)))
    rows = lsap.run_matcher(batch=2, queries=6, classes=4, max_targets=3, repeats=1, warmup=0, progress=False,
                            device="cpu")
    by_contender = {}
    for row in rows:
        by_contender.setdefault(row["contender"], []).append(row)
    assert all(row["optimal"] is True and "status" not in row for row in by_contender["matcher-fastvlp"])
    assert all(row["status"] == lsap.WRONG_RESULT for row in by_contender["matcher-fastvlp-unchecked"])
    assert all("optimal" not in row for row in by_contender["matcher-detr-host-scipy"])  # scipy is the reference
    assert lsap.has_wrong_result(rows) and not lsap.has_wrong_result(by_contender["matcher-fastvlp"])


def test_the_users_repeats_and_warmup_are_used_as_given(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(lsap, "run_cpu", lambda repeats, warmup: calls.append((repeats, warmup)) or [])
    assert lsap.main(["--device", "cpu", "--repeats", "2", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    assert lsap.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert calls == [(2, 0), lsap.CPU_DEFAULTS]
    assert lsap._chosen(argparse.Namespace(repeats=None, warmup=None), lsap.CUDA_DEFAULTS) == (30, 5)
    assert lsap._chosen(argparse.Namespace(repeats=3, warmup=1), lsap.CUDA_DEFAULTS) == (3, 1)  # no longer raised


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--warmup", "-1"]])
def test_lsap_rejects_bad_counts(bad, capsys):
    with pytest.raises(SystemExit):
        lsap.main(["--device", "cpu", *bad])
    assert "--repeats must be >= 1 and --warmup >= 0" in capsys.readouterr().err


def test_the_cuda_solver_rows_are_checked_once_per_shape(monkeypatch):
    # The CUDA path's bookkeeping, run on CPU tensors: a wrong fastvlp solver is flagged, a peer is not checked.
    solved = []
    right = lsap._gpu_contenders()["fastvlp-cuda"]

    def counted(cost):
        solved.append(cost.shape)
        return right(cost)

    contenders = {"fastvlp-cuda": counted,
                  "fastvlp-cuda-unchecked": lambda cost: torch.full(cost.shape[:2], -1, dtype=torch.int64),
                  "detr-host-scipy-loop": lambda cost: None}
    monkeypatch.setattr(lsap, "_gpu_contenders", lambda: contenders)
    monkeypatch.setattr(lsap, "_cuda_pool", lambda shape, size, device: [
        torch.rand(shape, generator=torch.Generator().manual_seed(seed)) for seed in range(size)])
    monkeypatch.setattr(lsap, "time_cuda_calls", lsap.time_host_calls)
    monkeypatch.setattr(lsap, "run_matcher", lambda **kwargs: [])
    rows = lsap.run_cuda(shapes=((2, 5, 3), (2, 4, 4)), repeats=2, warmup=1, progress=False)
    by_key = {(row["contender"], row["shape"]): row for row in rows}
    for shape in ("2x5x3", "2x4x4"):
        assert by_key[("fastvlp-cuda", shape)]["optimal"] is True and "status" not in by_key[("fastvlp-cuda", shape)]
        assert by_key[("fastvlp-cuda-unchecked", shape)]["status"] == lsap.WRONG_RESULT
        assert "optimal" not in by_key[("detr-host-scipy-loop", shape)]
    assert len(solved) == 2 * (3 + 1)  # per shape: the warm-up and timed calls, and one checked call
    assert lsap.has_wrong_result(rows)
