"""`fastvlp bench e2e` at a tiny size: the result files and their schema (no speeds asserted)."""
import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")

from fastvlp.bench.e2e import E2EQuery, RegionQuery, _compiled, build_contenders, main

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
