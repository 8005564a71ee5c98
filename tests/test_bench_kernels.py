"""`fastvlp bench kernels`: both benchmarks run whatever the solver check gives, the worse status is
returned, and --repeats is passed on as given."""
import sys
from types import SimpleNamespace

import pytest
import torch

import fastvlp.bench
from fastvlp.bench import kernels, lsap


@pytest.fixture
def benchmarks(monkeypatch):
    """Stand-ins for the two benchmarks that record their arguments and return the statuses set in
    ``statuses``; a GPU is reported present so that the attention benchmark is reached."""
    calls, statuses = [], {"lsap": 0, "attention": 0}

    def benchmark(name):
        def main(argv):
            calls.append((name, list(argv)))
            return statuses[name]
        return main

    attention = SimpleNamespace(main=benchmark("attention"))
    monkeypatch.setattr(lsap, "main", benchmark("lsap"))
    monkeypatch.setitem(sys.modules, "fastvlp.bench.attention", attention)
    monkeypatch.setattr(fastvlp.bench, "attention", attention, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return SimpleNamespace(calls=calls, statuses=statuses)


def test_a_failed_solver_check_still_runs_the_attention_benchmark(benchmarks, capsys):
    benchmarks.statuses["lsap"] = 1
    assert kernels.main([]) == 1
    assert [name for name, _ in benchmarks.calls] == ["lsap", "attention"]
    assert "solver check FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("lsap_status, attention_status", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_worse_status_is_returned(benchmarks, lsap_status, attention_status):
    benchmarks.statuses.update(lsap=lsap_status, attention=attention_status)
    assert kernels.main([]) == max(lsap_status, attention_status)


def test_repeats_is_passed_on_as_given_zero_included(benchmarks, tmp_path):
    kernels.main(["--repeats", "0", "--out-dir", str(tmp_path)])
    kernels.main([])
    assert benchmarks.calls == [
        ("lsap", ["--device", "all", "--repeats", "0", "--out-dir", str(tmp_path)]),
        ("attention", ["--repeats", "0", "--out-dir", str(tmp_path)]),
        ("lsap", ["--device", "all"]),
        ("attention", []),
    ]


def test_repeats_zero_is_reported_by_the_solver_benchmark(capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
