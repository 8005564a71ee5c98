"""`fastvlp bench e2e` at a tiny size: the result files and their schema (no speeds asserted)."""
import json

import pytest

pytest.importorskip("transformers")

from fastvlp.bench.e2e import main

TINY = ["--device", "cpu", "--preset", "tiny", "--image-sizes", "64x64", "--native-size", "64x96", "--batch-size", "1",
        "--repeats", "1", "--warmup", "0", "--bert-layers", "1", "--bert-hidden", "64", "--rpn-pre-nms", "300",
        "--rpn-post-nms", "20", "--text-length", "6"]


def test_e2e_bench_writes_every_row_and_stage(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(TINY + ["--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {"device", "versions", "amp", "results"}
    assert payload["amp"] is False and payload["versions"]["transformers"] != "missing"
    rows = payload["results"]
    keys = {"pipeline", "preset", "image_size", "native", "compiled", "batch_size", "median_ms", "p10_ms", "p90_ms", "stages"}
    assert all(set(row) == keys for row in rows)
    found = {(row["pipeline"], row["image_size"], row["native"]) for row in rows}
    assert found == {("e2e-fastvlp", "64x64", False), ("e2e-torch", "64x64", False),
                     ("region-thresholded", "64x64", False), ("region-36", "64x64", False),
                     ("region-thresholded", "64x96", True), ("region-36", "64x96", True)}
    for row in rows:
        expected = ("backbone", "encoder", "head") if row["pipeline"].startswith("e2e") else ("backbone", "rpn", "roi_heads", "bert")
        assert tuple(row["stages"]) == expected
        assert all(value > 0 for value in row["stages"].values())
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["median_ms"] == pytest.approx(sum(row["stages"].values()), rel=1e-6)  # one run: the stages add up
        assert row["preset"] == ("tiny" if row["pipeline"].startswith("e2e") else "r101-c4+bert-base")
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| region-36 |") == 2 and "roi_heads ms" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_bench_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(TINY + ["--image-sizes", "64by64"])
    with pytest.raises(SystemExit):
        main(TINY + ["--repeats", "0"])
