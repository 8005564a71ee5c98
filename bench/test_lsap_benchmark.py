"""Per-call micro-benchmarks of the CPU solvers for pytest-benchmark.

    pytest bench/test_lsap_benchmark.py --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

Each round gets a fresh batch from a pool (prepared outside the timed call).
"""
import itertools

import pytest

from fastvlp.bench.lsap import SHAPES, _cpu_contenders, assignment_is_optimal, make_pool, shape_label

pytest.importorskip("pytest_benchmark")
CONTENDERS = _cpu_contenders(max_threads=2)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_label)
@pytest.mark.parametrize("contender", sorted(CONTENDERS))
def test_lsap_cpu(benchmark, shape, contender):
    solve = CONTENDERS[contender]
    if isinstance(solve, str):
        pytest.skip(solve)
    batches = itertools.cycle(make_pool(shape, 20))
    benchmark.group = f"lsap-cpu-{shape_label(shape)}"
    benchmark.pedantic(solve, setup=lambda: ((next(batches),), {}), rounds=15, warmup_rounds=2)
    if contender.startswith("fastvlp"):  # the timed solver's own answers: a full matching at scipy's optimum
        batch = make_pool(shape, 1, seed=1)[0]
        assert assignment_is_optimal(batch, solve(batch))
