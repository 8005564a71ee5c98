"""`fastvlp bench generation` at a tiny size: the result files and their rows (no speeds asserted)."""
import json
import math

import pytest

from fastvlp.bench.generation import main

TINY = ["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--max-length", "4", "--num-beams", "4",
        "--repeats", "1", "--warmup", "0", "--image-size", "64x96", "--question-length", "6"]


def test_generation_bench_writes_one_row_per_backend_and_measurement(tmp_path, one_thread):
    assert main(TINY + ["--out-dir", str(tmp_path)]) == 0
    [json_path] = tmp_path.glob("*/generation.json")
    payload = json.loads(json_path.read_text())
    assert payload["benchmark"] == "generation" and payload["backends"] == ["fastvlp", "torch"]
    assert payload["image_size"] == "64x96" and payload["versions"]["torch"] != "missing"
    assert (payload["repeats"], payload["warmup"]) == (1, 0) and payload["complete"] is True
    rows = payload["results"]
    measurements = {"caption-beam4-cache", "caption-beam4-no-cache", "vqa"}
    assert sorted((row["contender"], row["name"]) for row in rows) == sorted(
        (backend, name) for backend in ("fastvlp", "torch") for name in measurements
    )
    for row in rows:
        assert len(row["raw_ms"]) == 1
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("median_ms", "p10_ms", "p90_ms"))
        if row["name"] == "vqa":
            assert row["questions_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
            # Same weights: the two backends' answer logits agree.
            assert row["max_abs_logit_diff_to_first_backend"] < 1e-3
        else:
            # The end token is never generated, so every caption runs to max_length.
            assert row["generated_tokens"] == 2 * 4
            assert row["tokens_per_s"] == pytest.approx(8 / (row["median_ms"] / 1e3))
    table = json_path.with_suffix(".md").read_text()
    assert table.count("| caption-beam4-no-cache |") == 2 and "questions_per_s" in table


def test_generation_bench_rejects_bad_arguments(tmp_path):
    for bad in (["--image-size", "64by96"], ["--repeats", "0"], ["--backends", "torch,torch"], ["--question-length", "1"]):
        with pytest.raises(SystemExit):
            main(TINY + bad + ["--out-dir", str(tmp_path)])
