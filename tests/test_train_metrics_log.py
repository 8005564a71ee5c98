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


def test_a_torn_last_line_is_dropped_before_the_next_append(tmp_path):
    """A crash mid-write leaves a last line without its end: truncating at the checkpoint's step drops it
    and ends the file on a newline, so that the records appended next each stay on a line of their own."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    losses = [random.uniform(0.5, 5.0) for _ in range(5)]
    for step in (1, 2, 3):
        log.write({"step": step, "loss": losses[step - 1]})
    with open(log.path, "a") as handle:
        handle.write('{"step": 4, "lo')  # torn right after the checkpoint's step 3
    assert log.truncate_after(3) == 1
    assert log.path.read_text().endswith("\n")
    for step in (4, 5):
        log.write({"step": step, "loss": losses[step - 1]})
    records = read_metrics(log.path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and [r["loss"] for r in records] == losses


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    loss = random.uniform(0.5, 5.0)
    log.path.write_text(json.dumps({"step": 1, "loss": loss}) + "\n" + json.dumps({"step": 2, "loss": loss}))
    assert log.truncate_after(2) == 0
    log.write({"step": 3, "loss": loss})
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert MetricsLog(tmp_path / "missing.jsonl").truncate_after(1) == 0
    with pytest.raises(TypeError, match="step"):
        log.truncate_after("2")
