"""What every benchmark shares: the provenance in each results file, and timing of compiled calls that
refuses to report an uncompiled fallback or a compilation inside the timed calls."""
import datetime
import json
import re
import time

import pytest
import torch

from fastvlp.bench import common


def _square_plus_one(x):
    return x * x + 1


def test_results_files_record_the_run_that_wrote_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVLP_BENCH_RUN_ID", "run-42")
    monkeypatch.setenv("FASTVLP_BENCH_GPU_TESTS", "passed")
    monkeypatch.setattr("sys.argv", ["bench-prog", "--repeats", "3"])
    rows = [common.result_row("n", "c", "s", [2.0, 1.0, 3.0])]
    path = common.write_results("demo", rows, "some-device", tmp_path, extra={"repeats": 3})
    payload = json.loads(path.read_text())
    assert path == tmp_path / "some-device" / "demo.json"
    assert payload["complete"] is True and payload["repeats"] == 3
    assert payload["results"][0]["raw_ms"] == [2.0, 1.0, 3.0] and payload["results"][0]["median_ms"] == 2.0
    origin = payload["provenance"]
    assert origin["run_id"] == "run-42" and origin["gpu_tests"] == "passed"
    assert origin["command"].endswith("bench-prog --repeats 3")
    # This test runs from the project's git checkout: a commit hash, or the reason there is none.
    assert re.fullmatch(r"[0-9a-f]{40}", origin["git_commit"]) or origin["git_commit"].startswith("unavailable")
    assert origin["git_dirty"] in (True, False, None)
    assert re.fullmatch(r"[0-9a-f]{64}", origin["source_sha256"])
    for key in ("started_utc", "written_utc"):
        stamp = datetime.datetime.strptime(origin[key], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 24 * 3600
    assert origin["torch"] == torch.__version__ and origin["hostname"]
    assert origin["cuda_toolkit"] == (torch.version.cuda or "none")
    for key in ("triton", "cudnn", "driver", "gpu", "cpu", "cpu_count", "torch_threads", "tf32_matmul", "tf32_cudnn"):
        assert key in origin
    if not torch.cuda.is_available():
        assert origin["gpu"] is None and origin["driver"].startswith("none")
    table = path.with_suffix(".md").read_text()
    assert "run id run-42" in table and "bench-prog --repeats 3" in table and "Partial" not in table


@pytest.mark.parametrize("answers, stated, expected", [
    ({"rev-parse": "a" * 40, "status": ""}, None, ("a" * 40, False)),
    ({"rev-parse": "a" * 40, "status": " M x.py"}, "aaaaaaa", ("a" * 40, True)),  # the same commit, stated short
    # A copied tree whose .git did not follow it: the stated commit first, git's beside it.
    ({"rev-parse": "a" * 40, "status": " M x.py"}, "b" * 7,
     ("b" * 7 + " (stated by FASTVLP_BENCH_GIT_COMMIT; git in the tree says " + "a" * 40 + " with changes)", None)),
    ({}, "b" * 7, ("b" * 7 + " (stated by FASTVLP_BENCH_GIT_COMMIT)", None)),  # no git at all
    ({}, None, ("unavailable: OSError", None)),
])
def test_git_state_prefers_a_stated_commit_that_git_contradicts(monkeypatch, answers, stated, expected):
    def fake_run(command, cwd):
        key = "rev-parse" if "rev-parse" in command else "status"
        if key not in answers:
            raise OSError("no git")
        return answers[key]

    monkeypatch.setattr(common, "_run", fake_run)
    if stated is None:
        monkeypatch.delenv("FASTVLP_BENCH_GIT_COMMIT", raising=False)
    else:
        monkeypatch.setenv("FASTVLP_BENCH_GIT_COMMIT", stated)
    state = common._git_state()
    assert (state["git_commit"], state["git_dirty"]) == expected


def test_a_partial_results_file_says_so(tmp_path):
    path = common.write_results("demo", [], "dev", tmp_path, complete=False)
    assert json.loads(path.read_text())["complete"] is False
    assert "Partial results" in path.with_suffix(".md").read_text()


def test_compiled_timing_reports_a_recompile_limit_hit_instead_of_an_uncompiled_timing():
    torch._dynamo.reset()
    sizes = iter(range(2, 100))

    def call(index):  # a new shape each call: each is a recompilation with dynamic=False
        return compiled(torch.ones(next(sizes)))

    compiled = torch.compile(_square_plus_one, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(Exception) as caught:
        common.time_compiled_calls(common.time_host_calls, call, repeats=1, warmup=3)
    reason = common.error_reason(caught.value)
    assert "recompile limit" in reason and reason.startswith("not timed")
    # Outside the strict context, the setting is back to Dynamo's default.
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False


def test_compiled_timing_refuses_a_compilation_inside_the_timed_calls():
    torch._dynamo.reset()
    compiled = torch.compile(_square_plus_one, backend="eager", dynamic=False)
    with pytest.raises(common.CompiledDuringTiming, match="compiled 1 frame"):
        # The warm-up sees one shape, the timed call another.
        common.time_compiled_calls(common.time_host_calls, lambda index: compiled(torch.ones(2 + (index > 0))),
                                   repeats=1, warmup=1)
    timings = common.time_compiled_calls(common.time_host_calls, lambda index: compiled(torch.ones(5)),
                                         repeats=2, warmup=1)
    assert len(timings) == 2 and all(value > 0 for value in timings)
    with pytest.raises(ValueError, match="warmup"):
        common.time_compiled_calls(common.time_host_calls, lambda index: None, repeats=1, warmup=0)


def test_drift_flags_timings_that_were_still_falling():
    settled = common.result_row("x", "c", "s", [1.0, 1.02, 0.99, 1.01, 1.0, 0.98])
    assert settled["drift"] == pytest.approx(1.0) and settled["settled"] is True
    falling = common.result_row("x", "c", "s", [11.9, 7.5, 5.1, 3.9, 2.8, 1.8, 1.7, 1.75])
    assert falling["drift"] == pytest.approx(6.3 / 1.775) and falling["settled"] is False
    assert "drift" not in common.result_row("x", "c", "s", [1.0, 2.0, 3.0]) and not common.unsettled({})


def test_warm_up_lasts_for_the_calls_and_the_time_asked():
    calls, synced = [], []
    assert common.warm_up(calls.append, 3, 0.0, lambda: synced.append(1)) == 3
    assert calls == [0, 1, 2] and len(synced) == 3
    start = time.perf_counter()
    made = common.warm_up(lambda index: time.sleep(0.01), 1, 0.05)
    assert made >= 4 and time.perf_counter() - start >= 0.05
    # the timed calls take the indices after the warm-up's
    seen = []
    assert len(common.time_host_calls(seen.append, repeats=2, warmup=3)) == 2 and seen == [0, 1, 2, 3, 4]
