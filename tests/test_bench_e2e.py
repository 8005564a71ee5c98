"""`fastvlp bench e2e` at a tiny size: the result files and their schema (no speeds asserted), and the
guards that keep a compiled row from reporting an uncompiled or compiling run as a timing."""
import argparse
import json
import time

import pytest
import torch

from fastvlp.bench import common

pytest.importorskip("transformers")

from fastvlp.bench import e2e
from fastvlp.bench.e2e import E2EQuery, RegionQuery, _compiled, build_contenders, main

TINY = ["--device", "cpu", "--preset", "tiny", "--image-sizes", "64x64", "--native-size", "64x96", "--batch-size", "1",
        "--repeats", "2", "--warmup", "1", "--bert-layers", "1", "--bert-hidden", "64", "--rpn-pre-nms", "300",
        "--rpn-post-nms", "20", "--text-length", "6"]


def test_e2e_bench_writes_every_row_and_stage(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(TINY + ["--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"benchmark", "device", "complete", "provenance", "versions", "amp", "repeats", "warmup",
                            "min_warmup_s", "batch_size", "text_length", "image_sizes", "native_size", "compile",
                            "results"}
    assert payload["benchmark"] == "e2e" and payload["complete"] is True
    assert (payload["repeats"], payload["warmup"], payload["batch_size"], payload["text_length"]) == (2, 1, 1, 6)
    assert payload["min_warmup_s"] == 0.0  # the time floor is for GPUs
    assert payload["image_sizes"] == ["64x64"] and payload["native_size"] == "64x96" and payload["compile"] is False
    assert payload["amp"] is False and payload["versions"]["transformers"] != "missing"
    assert payload["provenance"]["command"] and "torch_threads" in payload["provenance"]
    rows = payload["results"]
    keys = {"pipeline", "preset", "image_size", "native", "compiled", "batch_size", "median_ms", "p10_ms", "p90_ms",
            "raw_ms", "warmup_runs", "stages", "stages_raw_ms", "logits_reference", "max_abs_logit_diff_to_reference"}
    assert all(set(row) == keys for row in rows)
    found = {(row["pipeline"], row["image_size"], row["native"]) for row in rows}
    assert found == {("e2e-fastvlp", "64x64", False), ("e2e-torch", "64x64", False),
                     ("region-thresholded", "64x64", False), ("region-36", "64x64", False),
                     ("region-thresholded", "64x96", True), ("region-36", "64x96", True)}
    for row in rows:
        expected = ("backbone", "encoder", "head") if row["pipeline"].startswith("e2e") else ("backbone", "rpn", "roi_heads", "bert")
        assert tuple(row["stages"]) == tuple(row["stages_raw_ms"]) == expected
        assert all(value > 0 for value in row["stages"].values())
        assert len(row["raw_ms"]) == 2 and all(len(values) == 2 for values in row["stages_raw_ms"].values())
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["median_ms"] == pytest.approx(sum(row["raw_ms"]) / 2)
        for repeat in range(2):  # each run's stages add up to its total
            stage_sum = sum(values[repeat] for values in row["stages_raw_ms"].values())
            assert row["raw_ms"][repeat] == pytest.approx(stage_sum, rel=1e-6)
        assert row["preset"] == ("tiny" if row["pipeline"].startswith("e2e") else "r101-c4+bert-base")
        assert row["warmup_runs"] == 1
        # Only e2e-torch has a reference other than itself: E2E-VLP with fastvlp attention, the same weights
        # and pixels, so in float32 their answers agree.
        if row["pipeline"] == "e2e-torch":
            assert row["logits_reference"] == "e2e-fastvlp (eager)"
            assert 0 <= row["max_abs_logit_diff_to_reference"] < 1e-3
        else:
            assert row["logits_reference"] == f"{row['pipeline']} (eager)"
            assert row["max_abs_logit_diff_to_reference"] is None
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| region-36 |") == 2 and "roi_heads ms" in table
    assert "Repeats 2 after 1 warm-up runs" in table and "| drift |" in table and "Command:" in table and "TF32 matmul" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_bench_cut_short_keeps_the_rows_it_timed(tmp_path, monkeypatch):
    timed = e2e.time_query
    calls = []

    def stopped_at_the_third_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a step timeout's signal leaves behind
        return timed(*args, **kwargs)

    monkeypatch.setattr(e2e, "time_query", stopped_at_the_third_row)
    out = tmp_path / "e2e.json"
    with pytest.raises(KeyboardInterrupt):
        main(TINY + ["--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] is False and len(payload["results"]) == 2
    assert all(row["median_ms"] > 0 for row in payload["results"])
    assert out.with_suffix(".md").read_text().count("\n| e2e-") == 2


def test_e2e_bench_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(TINY + ["--image-sizes", "64by64"])
    with pytest.raises(SystemExit):
        main(TINY + ["--repeats", "0"])



@pytest.mark.parametrize("bad, message", [
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--compile", "--warmup", "0"], "--warmup must be >= 1"),  # the compiled rows compile in their warm-up
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--device", "gpu"], "--device must name a device"),
    (["--image-sizes", "0x0"], "sides of at least 32"),
    (["--text-length", "41"], "--text-length must be in 3..40"),
])
def test_e2e_bench_names_the_bad_argument_before_building_models(monkeypatch, capsys, bad, message):
    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before the arguments were checked")

    monkeypatch.setattr(e2e, "run", no_run)
    with pytest.raises(SystemExit) as stopped:
        main(TINY + bad)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_e2e_bench_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--device", "cuda"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_every_other_size_reverses_the_contenders_order():
    jobs = e2e.job_order(3, [(64, 64), (96, 96), (128, 128)], (64, 96), [1, 2])
    assert jobs == [(0, (64, 64), False), (1, (64, 64), False), (2, (64, 64), False),
                    (2, (96, 96), False), (1, (96, 96), False), (0, (96, 96), False),
                    (0, (128, 128), False), (1, (128, 128), False), (2, (128, 128), False),
                    (1, (64, 96), True), (2, (64, 96), True)]


def _row(pipeline, compiled=False, size="64x64", native=False, drift=None):
    row = {"pipeline": pipeline, "compiled": compiled, "image_size": size, "native": native}
    if drift is not None:
        row["drift"] = drift
    return row


def test_answers_are_compared_with_the_reference_once_both_are_known():
    rows = [_row("e2e-torch"), _row("region-36", compiled=True)]
    answers = {("e2e-torch", False, "64x64", False): torch.tensor([1.0, 2.0]),
               ("region-36", True, "64x64", False): torch.tensor([0.0])}
    e2e.fill_logit_differences(rows, answers)  # the references are not timed yet
    assert [row["max_abs_logit_diff_to_reference"] for row in rows] == [None, None]
    assert [row["logits_reference"] for row in rows] == ["e2e-fastvlp (eager)", "region-36 (eager)"]
    rows += [_row("e2e-fastvlp"), _row("region-36")]
    answers[("e2e-fastvlp", False, "64x64", False)] = torch.tensor([1.0, 2.5])
    answers[("region-36", False, "64x64", False)] = torch.tensor([0.25])
    e2e.fill_logit_differences(rows, answers)
    assert [row["max_abs_logit_diff_to_reference"] for row in rows] == [0.5, 0.25, None, None]


def test_unsettled_rows_are_marked_in_the_table_and_named_after_it(tmp_path):
    rows = [dict(_row("e2e-fastvlp", drift=1.5), preset="tiny", batch_size=1, median_ms=2.0, p10_ms=1.0,
                 p90_ms=3.0, stages={"head": 2.0}, max_abs_logit_diff_to_reference=None),
            dict(_row("e2e-torch", drift=1.01), preset="tiny", batch_size=1, median_ms=2.0, p10_ms=1.0,
                 p90_ms=3.0, stages={"head": 2.0}, max_abs_logit_diff_to_reference=1.5e-6)]
    payload = {"device": "cpu", "amp": True, "results": rows}
    table = e2e.markdown(payload)
    assert "| 1.50 unsettled | 2.0 | - |" in table and "| 1.01 | 2.0 | 1.5e-06 |" in table
    assert e2e.unsettled_summary(payload) == "unsettled, read their times with care: e2e-fastvlp 64x64 (drift 1.50)"
    assert e2e.unsettled_summary({"results": rows[1:]}) is None


class SleepingQuery:
    """A one-stage query that takes about a millisecond and answers with its run's number."""

    def __init__(self):
        self.runs = 0

    def stages(self, images, input_ids, text_mask):
        def stage():
            time.sleep(0.001)
            self.runs += 1
            return torch.tensor([float(self.runs)])

        return (("head", stage),)


def test_the_warm_up_lasts_its_minimum_time_and_the_last_answers_are_returned():
    query = SleepingQuery()
    measured, logits = e2e.time_query(query, torch.zeros(1, 3, 4, 4), None, None, repeats=6, warmup=1, amp=False,
                                      device=torch.device("cpu"), min_warmup_s=0.05)
    assert measured["warmup_runs"] > 1 and query.runs == measured["warmup_runs"] + 6
    assert logits.item() == query.runs  # the last timed run's answers
    assert len(measured["raw_ms"]) == 6 and isinstance(measured["drift"], float)
    assert measured["settled"] is (not common.unsettled(measured))
    assert e2e.min_warmup_seconds(torch.device("cuda")) == common.MIN_CUDA_WARMUP_S > 0
    assert e2e.min_warmup_seconds(torch.device("cpu")) == 0.0


def _scale(x, factor):
    return x * factor + 1


class CompiledQuery:
    """A one-stage query around a compiled (or, with ``compile=False``, plain) function; ``shapes`` gives
    each run's input length."""

    def __init__(self, shapes, compile=True):
        self.function = torch.compile(_scale, backend="eager", dynamic=False) if compile else _scale
        self.shapes = iter(shapes)

    def stages(self, images, input_ids, text_mask):
        length = next(self.shapes)
        return (("backbone", lambda: self.function(torch.ones(length), 2.0)),)


def _time(query, repeats, warmup, compiled=True):
    images = torch.zeros(1, 3, 4, 4)
    measured, _ = e2e.time_query(query, images, None, None, repeats, warmup, False, torch.device("cpu"),
                                 compiled=compiled)
    return measured


def test_a_compiled_query_that_compiles_while_timed_is_refused():
    torch._dynamo.reset()
    measured = _time(CompiledQuery([3, 3, 3]), repeats=2, warmup=1)
    assert len(measured["raw_ms"]) == 2
    torch._dynamo.reset()
    with pytest.raises(common.CompiledDuringTiming):
        _time(CompiledQuery([3, 4, 5]), repeats=2, warmup=1)  # new shapes after the warm-up


def test_compiled_rows_are_compiled_afresh_and_a_fallback_is_reported(monkeypatch):
    # Four compiled rows over one function: without the reset before each, the shared cache would pass
    # the (lowered) recompile limit and the later rows would time uncompiled code.
    torch._dynamo.reset()
    queries = [CompiledQuery([length] * 3, compile=index >= 2) for index, length in enumerate((3, 4, 5, 6))]
    contenders = [(f"e2e-q{index}", "tiny", query) for index, query in enumerate(queries[:2])]
    compiled = iter(queries[2:])
    monkeypatch.setattr(e2e, "build_contenders", lambda args, device: list(contenders))
    monkeypatch.setattr(e2e, "_compiled", lambda query: next(compiled))
    args = argparse.Namespace(device="cpu", compile=True, seed=0, batch_size=1, text_length=4, image_sizes=[(4, 4)],
                              native_size=(4, 4), repeats=2, warmup=1, amp=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        payload = e2e.run(args)
    rows = payload["results"]
    assert [row["compiled"] for row in rows] == [False, False, True, True]
    assert all("status" not in row and len(row["raw_ms"]) == 2 for row in rows)
    # Without the reset the second compiled row reaches the limit: it is reported, not timed.
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    queries[:] = [CompiledQuery([length] * 3, compile=index >= 2) for index, length in enumerate((3, 4, 5, 6))]
    contenders[:] = [(f"e2e-q{index}", "tiny", query) for index, query in enumerate(queries[:2])]
    compiled = iter(queries[2:])
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = e2e.run(args)["results"]
    assert "status" not in rows[2]
    assert rows[3]["median_ms"] is None and rows[3]["raw_ms"] == [] and "recompile limit" in rows[3]["status"]
    assert "recompile limit" in e2e.markdown(dict(payload, results=rows))


def test_compiled_contenders_leave_the_eager_ones_uncompiled():
    # torch.compile only wraps here; nothing is traced or run, so this holds on a CPU.
    args = argparse.Namespace(seed=0, preset="tiny", bert_layers=1, bert_hidden=64, rpn_pre_nms=300, rpn_post_nms=20)
    compiled_type = torch._dynamo.eval_frame.OptimizedModule
    for name, _, query in build_contenders(args, torch.device("cpu")):
        if isinstance(query, E2EQuery):
            model, head = query.model, query.head
            originals = {"backbone": model.backbone, "encoder": model.encoder}
            compiled = _compiled(query)
            assert compiled.model is not model
            for child, original in originals.items():
                assert getattr(model, child) is original and not isinstance(original, compiled_type), name
                wrapped = getattr(compiled.model, child)
                assert isinstance(wrapped, compiled_type) and wrapped._orig_mod is original, name
            assert query.head is head and not isinstance(head, compiled_type)
            assert isinstance(compiled.head, compiled_type) and compiled.head._orig_mod is head
            assert not any(isinstance(module, compiled_type) for module in model.modules()), name
        else:
            assert isinstance(query, RegionQuery)
            pipeline = query.pipeline
            detector, transformer = pipeline.detector, pipeline.transformer
            res4, res5 = detector.res4, detector.res5
            compiled = _compiled(query)
            assert pipeline.detector is detector and pipeline.transformer is transformer, name
            assert detector.res4 is res4 and detector.res5 is res5, name
            assert not any(isinstance(module, compiled_type) for module in pipeline.modules()), name
            assert compiled.pipeline.detector is not detector
            for wrapped, original in ((compiled.pipeline.detector.res4, res4), (compiled.pipeline.detector.res5, res5),
                                      (compiled.pipeline.transformer, transformer)):
                assert isinstance(wrapped, compiled_type) and wrapped._orig_mod is original, name
            # The weights are shared, not copied.
            assert compiled.pipeline.detector.rpn is detector.rpn
