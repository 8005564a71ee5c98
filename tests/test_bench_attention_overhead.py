"""The host-overhead benchmark's bookkeeping without a GPU: how it times device work behind a sleep, its
settled flag, its CLI checks, and what it writes."""
import json

import pytest
import torch

from fastvlp.bench import attention_overhead, common


class FakeCuda:
    """Stands in for torch.cuda's events, sleep and synchronisation; logs the order of the calls.
    ``reached`` scripts what each start event's ``query()`` answers (True: the GPU was already past it)."""

    def __init__(self, reached):
        self.log, self.reached = [], list(reached)
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self):
                fake.log.append("record")

            def query(self):
                return fake.reached.pop(0)

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 0.25

        self.Event = Event

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: self.log.append(("sleep", cycles)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_the_sleep_is_queued_before_the_start_event(monkeypatch):
    cuda = FakeCuda(reached=[False, False])
    cuda.install(monkeypatch)
    times, uncovered, cycles = attention_overhead.device_times_us(lambda: cuda.log.append("call"), 2, 1000)
    assert cuda.log == [("sleep", 1000), "record", "call", "record"] * 2
    assert times == [250.0, 250.0] and uncovered == 0 and cycles == 1000


def test_a_call_the_gpu_caught_up_with_is_measured_again_with_a_longer_sleep(monkeypatch):
    cuda = FakeCuda(reached=[True, False, False])
    cuda.install(monkeypatch)
    times, uncovered, cycles = attention_overhead.device_times_us(lambda: None, 2, 1000)
    sleeps = [entry[1] for entry in cuda.log if isinstance(entry, tuple)]
    assert sleeps == [1000, 2000, 2000]  # the longer sleep is kept for the calls after it
    assert len(times) == 2 and uncovered == 0 and cycles == 2000


def test_calls_that_never_get_ahead_of_the_gpu_are_counted(monkeypatch):
    doublings = attention_overhead.MAX_SLEEP_DOUBLINGS
    cuda = FakeCuda(reached=[True] * (doublings + 2))
    cuda.install(monkeypatch)
    times, uncovered, cycles = attention_overhead.device_times_us(lambda: None, 2, 1000)
    sleeps = [entry[1] for entry in cuda.log if isinstance(entry, tuple)]
    assert sleeps == [1000 * 2 ** n for n in range(doublings + 1)] + [1000 * 2 ** doublings]
    assert len(times) == 2 and uncovered == 2


def test_a_row_is_settled_only_if_host_and_device_timings_are():
    steady, falling = [1.0] * 8, [2.0] * 4 + [1.0] * 4

    def row(device_ms, host_us):
        fields = dict(raw_ms=device_ms, host_us=1.0, host_raw_us=host_us,
                      host_drift=common.summarize(host_us).get("drift"))
        return attention_overhead.overhead_row("S", "fastvlp", "s", "fwd", 0, fields)

    assert row(steady, steady)["settled"] is True
    assert row(falling, steady)["settled"] is False
    assert row(steady, falling)["settled"] is False
    assert row(steady, falling)["host_drift"] == 2.0


@pytest.mark.parametrize("arguments, message", [
    (["--warmup", "0"], "--warmup >= 1"),
    (["--profile", "nope"], "--profile: unknown ['nope']; expected names from E X S C-self C-cross D standard"),
    (["--scenarios", "S", "Q"], "--scenarios: unknown ['Q']"),
])
def test_the_overhead_cli_rejects_bad_arguments(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention_overhead.main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_and_profile_table_reject_unknown_names():
    with pytest.raises(ValueError, match="names: unknown"):
        attention_overhead.run(["Q"])
    with pytest.raises(ValueError, match="unknown scenario 'Q'"):
        attention_overhead.profile_table("Q")


def test_the_cli_writes_after_each_scenario_and_saves_the_profile(tmp_path, monkeypatch):
    written, results = [], tmp_path / "fake-gpu" / "attention_overhead.json"

    def fake_run(names, repeats, warmup, after_scenario):
        rows = []
        for name in names:
            rows.append(common.result_row(name, "fastvlp", "s", [0.1] * 6, mode="fwd", host_us=20.0,
                                          device_us=100.0, latency_us=120.0))
            after_scenario(rows)
            written.append(json.loads(results.read_text()))
        return rows

    monkeypatch.setattr(attention_overhead, "run", fake_run)
    monkeypatch.setattr(attention_overhead, "profile_table", lambda name: f"profile of {name}")
    monkeypatch.setattr(attention_overhead, "device_name", lambda device: "fake-gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    arguments = ["--out-dir", str(tmp_path), "--scenarios", "S", "X", "--profile", "X"]
    assert attention_overhead.main(arguments) == 0
    assert [len(payload["results"]) for payload in written] == [1, 2]
    assert all(payload["complete"] is False for payload in written)
    assert json.loads(results.read_text())["complete"] is True
    table = (tmp_path / "fake-gpu" / "attention_overhead.md").read_text()
    assert "| host_us | device_us | latency_us | drift | host_drift | settled |" in table
    assert "profile of X" in (tmp_path / "fake-gpu" / "attention_overhead_profile.txt").read_text()
