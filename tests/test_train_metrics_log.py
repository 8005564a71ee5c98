import json
import math
import random

import pytest

from fastvlp.train.metrics_log import MetricsLog, read_metrics


def test_append_truncate_and_non_finite_values(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    losses = [random.uniform(0.5, 5.0) for _ in range(6)]
    for step, loss in enumerate(losses, start=1):
        log.write({"step": step, "loss": loss})
    log.write({"step": 7, "loss": math.nan, "lr": math.inf})
    records = read_metrics(log.path)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["loss"] for r in records[:6]] == losses
    assert records[6]["loss"] is None and records[6]["lr"] is None
    assert log.truncate_after(4) == 3
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3, 4] and log.last_step() == 4
    with open(log.path, "a") as handle:
        handle.write('{"step": 5, "lo')  # a line torn by a crash
    assert log.last_step() == 4
    with pytest.raises(TypeError, match="record"):
        log.write(["step", 1])
    json.loads(log.path.read_text().splitlines()[0])
