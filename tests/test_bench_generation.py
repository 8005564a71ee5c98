"""`fastvlp bench generation` at a tiny size: the result files and their rows (no speeds asserted), the
backends' turns, the comparison with the first backend, and the argument checks."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from fastvlp.bench import common, generation
from fastvlp.bench.generation import main
from fastvlp.models import get_preset

TINY = ["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--max-length", "4", "--num-beams", "4",
        "--repeats", "1", "--warmup", "1", "--image-size", "64x96", "--question-length", "6"]


def test_generation_bench_writes_one_row_per_backend_and_measurement(tmp_path, one_thread):
    assert main(TINY + ["--out-dir", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*/generation.json")
    payload = json.loads(json_path.read_text())
    assert payload["benchmark"] == "generation" and payload["backends"] == ["fastvlp", "torch"]
    assert payload["image_size"] == "64x96" and payload["versions"]["torch"] != "missing"
    assert (payload["repeats"], payload["warmup"]) == (1, 1) and payload["complete"] is True
    assert payload["min_warmup_s"] == 0.0  # the time floor is for GPUs
    rows = payload["results"]
    measurements = {"caption-beam4-cache", "caption-beam4-no-cache", "vqa"}
    assert sorted((row["contender"], row["name"]) for row in rows) == sorted(
        (backend, name) for backend in ("fastvlp", "torch") for name in measurements
    )
    for row in rows:
        assert len(row["raw_ms"]) == 1
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("median_ms", "p10_ms", "p90_ms"))
        assert "drift" not in row and "settled" not in row  # one timing cannot tell
        assert "status" not in row  # float32 on the CPU: the backends agree
        if row["name"] == "vqa":
            assert row["questions_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
            # Same weights: the two backends' answer logits agree.
            assert row["max_abs_logit_diff_to_first_backend"] < 1e-3
        else:
            # The end token is never generated, so every caption runs to max_length.
            assert row["generated_tokens"] == 2 * 4
            assert row["tokens_per_s"] == pytest.approx(8 / (row["median_ms"] / 1e3))
            assert row["captions_equal_to_first_backend"] == 1.0
    table = json_path.with_suffix(".md").read_text()
    assert table.count("| caption-beam4-no-cache |") == 2 and "questions_per_s" in table and "drift" in table


def _fake_run(monkeypatch, captions_by_backend, logits_by_backend, raw_ms=(1.0,) * 6):
    """Replace the models and the timed calls: record the order the backends are measured in, and return
    the given outputs and timings."""
    order = []
    config = get_preset("tiny")

    def timings(backend):
        return raw_ms[backend] if isinstance(raw_ms, dict) else raw_ms

    monkeypatch.setattr(generation, "build_models", lambda preset, backends, device, seed: (
        {backend: SimpleNamespace(config=config, backend=backend) for backend in backends}, None))

    def caption_row(model, backend, inputs, max_length, num_beams, mode):
        order.append((mode, backend))
        row = common.result_row(f"caption-{mode}", backend, inputs.shape, timings(backend))
        row["tokens_per_s"] = 1.0
        return row, captions_by_backend[backend]

    def vqa_row(model, backend, vqa_head, inputs):
        order.append(("vqa", backend))
        row = common.result_row("vqa", backend, inputs.shape, timings(backend))
        row["questions_per_s"] = 1.0
        return row, logits_by_backend[backend]

    monkeypatch.setattr(generation, "caption_row", caption_row)
    monkeypatch.setattr(generation, "vqa_row", vqa_row)
    return order


def _run(**kwargs):
    return generation.run("tiny", batch_size=2, max_length=3, repeats=6, warmup=1, device="cpu", image_size=(32, 32),
                          question_length=4, **kwargs)


def test_the_backends_take_turns_going_first(monkeypatch):
    same = {"fastvlp": [[5, 6]], "torch": [[5, 6]]}
    logits = {"fastvlp": torch.zeros(2, 3), "torch": torch.zeros(2, 3)}
    order = _fake_run(monkeypatch, same, logits)
    rows = _run()
    assert order == [("cache", "fastvlp"), ("cache", "torch"), ("no-cache", "torch"), ("no-cache", "fastvlp"),
                     ("vqa", "fastvlp"), ("vqa", "torch")]
    # The rows keep the backends' order whichever was timed first, and agree with the first backend.
    assert [row["contender"] for row in rows] == ["fastvlp", "torch"] * 3
    assert all("status" not in row and row["settled"] is True for row in rows)


def test_float32_outputs_that_differ_from_the_first_backend_are_wrong_results(monkeypatch, capsys):
    captions = {"fastvlp": [[5, 6], [7, 8]], "torch": [[5, 6], [7, 9]]}
    logits = {"fastvlp": torch.zeros(2, 3), "torch": torch.full((2, 3), 0.5)}
    _fake_run(monkeypatch, captions, logits)
    rows = {(row["name"], row["contender"]): row for row in _run()}
    torch_caption = rows[("caption-cache", "torch")]
    assert torch_caption["captions_equal_to_first_backend"] == 0.5
    assert torch_caption["status"] == "wrong result: 1 of 2 captions differ from fastvlp's in float32"
    assert rows[("vqa", "torch")]["max_abs_logit_diff_to_first_backend"] == 0.5
    assert rows[("vqa", "torch")]["status"].startswith("wrong result: answer logits differ from fastvlp's")
    assert not any("status" in row for (name, backend), row in rows.items() if backend == "fastvlp")
    assert "wrong result: 1 of 2 captions differ" in capsys.readouterr().out


def test_with_tf32_or_bf16_a_difference_is_recorded_not_flagged(monkeypatch, capsys):
    captions = {"fastvlp": [[5, 6], [7, 8]], "torch": [[5, 6], [7, 9]]}
    logits = {"fastvlp": torch.zeros(2, 3), "torch": torch.full((2, 3), 0.5)}
    _fake_run(monkeypatch, captions, logits)
    monkeypatch.setattr(generation, "exact_precision", lambda device: False)
    rows = _run()
    assert not any("status" in row for row in rows)
    assert [row["captions_equal_to_first_backend"] for row in rows if row["name"] != "vqa"] == [1.0, 0.5] * 2
    out = capsys.readouterr().out
    assert "captions equal to the first backend's: 50%" in out and "max |logit diff| to the first backend: 0.5" in out


def test_the_printed_ratio_says_when_a_row_had_not_settled(monkeypatch, capsys):
    same = {"fastvlp": [[5]], "torch": [[5]]}
    logits = {"fastvlp": torch.zeros(1, 3), "torch": torch.zeros(1, 3)}
    falling = (4.0, 4.0, 4.0, 2.0, 2.0, 2.0)  # the first half twice the second: still warming up
    _fake_run(monkeypatch, same, logits, raw_ms={"fastvlp": falling, "torch": (3.0,) * 6})
    rows = _run()
    first = rows[0]
    assert first["contender"] == "fastvlp" and first["drift"] == 2.0 and first["settled"] is False
    assert rows[1]["settled"] is True
    out = capsys.readouterr().out
    assert "caption-cache: fastvlp's speed-up over torch: 1.00x (unsettled: fastvlp drift 2.00)" in out


def test_the_warm_up_has_a_time_floor_on_gpus_only():
    assert generation.min_warmup_seconds(torch.device("cuda")) == common.MIN_CUDA_WARMUP_S > 0
    assert generation.min_warmup_seconds(torch.device("cpu")) == 0.0
    calls = []
    timings = generation.time_calls(lambda: calls.append(1), repeats=3, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 5 and len(timings) == 3


@pytest.mark.parametrize("bad, message", [
    (["--image-size", "64by96"], "--image-size must look like"),
    (["--image-size", "0x0"], "--image-size must look like"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--backends", "torch,torch"], "--backends must name distinct backends"),
    (["--backends", "fastvlp,nope"], "--backends must name distinct backends"),
    (["--question-length", "1"], "--question-length must be in 2..40"),
    (["--question-length", "500"], "--question-length must be in 2..40"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--device", "gpu"], "--device must name a device"),
])
def test_generation_bench_rejects_bad_arguments_before_building_models(tmp_path, monkeypatch, capsys, bad, message):
    def no_models(*args, **kwargs):
        raise AssertionError("the models were built before the arguments were checked")

    monkeypatch.setattr(generation, "build_models", no_models)
    with pytest.raises(SystemExit) as stopped:
        main(TINY + bad + ["--out-dir", str(tmp_path)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_generation_bench_without_a_gpu_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_caption_mode_outside_the_three_is_refused():
    with pytest.raises(ValueError, match="mode"):
        generation.caption_row(None, "fastvlp", None, 4, 4, "graph")


@pytest.mark.cuda
def test_on_cuda_the_captured_decoding_is_measured_and_gives_the_cached_captions(tmp_path):
    argv = [a if a != "cpu" else "cuda" for a in TINY]
    assert main(argv + ["--out-dir", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*/generation.json")
    rows = {(row["name"], row["contender"]): row for row in json.loads(json_path.read_text())["results"]}
    for backend in ("fastvlp", "torch"):
        graph = rows[("caption-beam4-cuda-graph", backend)]
        assert graph["cuda_graph"] is True and graph["generated_tokens"] == 2 * 4
        assert rows[("caption-beam4-cache", backend)]["cuda_graph"] is False
