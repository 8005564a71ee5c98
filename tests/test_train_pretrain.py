"""End-to-end pre-training runs on a tiny synthetic corpus (CPU, a few steps each)."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import small_options, write_corpus

from fastvlp.cli import main as cli_main
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.train.checkpoint import list_checkpoints
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.pretrain import NonFiniteLossError, RunExistsError, run_pretraining

REQUIRED = ("step", "loss", "loss_mlm", "loss_itm", "loss_det", "loss_cap", "lr", "lr_backbone", "skipped_records")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    return run_pretraining(small_options(data, out, max_steps=4))


def test_stop_after_then_resume_is_bitwise_equal_to_a_straight_run(data, straight, tmp_path):
    out = tmp_path / "run"
    first = run_pretraining(small_options(data, out, max_steps=4, stop_after=2))
    assert first.step == 2 and [p.name for p in list_checkpoints(out)] == ["step-2"]
    second = run_pretraining(small_options(data, out, max_steps=4, resume=True))  # the same command line resumes
    assert second.step == 4
    a = load_file(str(straight.checkpoint / "model.safetensors"))
    b = load_file(str(second.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(straight.checkpoint / "optimizer.safetensors"))
    opt_b = load_file(str(second.checkpoint / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)

    records = read_metrics(out / "metrics.jsonl")
    reference = read_metrics(straight.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # appended, no step twice
    for mine, theirs in zip(records, reference):
        assert mine["lr"] == theirs["lr"] and mine["loss"] == theirs["loss"]  # same schedule, same batches
    # a resume of a finished run does nothing and logs nothing again
    third = run_pretraining(small_options(data, out, max_steps=4, resume=True))
    assert third.step == 4 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_metrics_and_checkpoint_contents(straight):
    records = read_metrics(straight.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert all(key in record for key in REQUIRED)
        assert record["loss"] > 0 and all(isinstance(record[k], float) and record[k] >= 0 for k in ("loss_mlm", "loss_itm", "loss_cap"))  # no masked token gives 0
        parts = record["loss_mlm"] + record["loss_itm"] + (record["loss_det"] or 0.0) + record["loss_cap"]
        assert record["loss"] == pytest.approx(parts, rel=1e-5)
    assert records[0]["backends"]["attention"] == "reference" and records[0]["backends"]["matcher"] == "fastvlp"
    # warm-up of 1 step (10% of 4 is rounded up to 1), then linear decay; the tiny preset's lr and
    # lr_backbone are both 5e-4
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 5e-4, 5e-4 * 2 / 3, 5e-4 / 3])
    assert [r["lr_backbone"] for r in records] == [r["lr"] for r in records]
    names = {p.name for p in straight.checkpoint.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "objects_vocab.txt", "attributes_vocab.txt",
            "trainer_state.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "scheduler.json"} <= names
    assert straight.checkpoint.name == "step-4"
    trainer = json.loads((straight.checkpoint / "trainer_state.json").read_text())
    assert trainer["step"] == 4 and trainer["sampler"]["position"] % 2 == 0
    from fastvlp.models.config import E2EVLPConfig

    config = E2EVLPConfig.from_json((straight.checkpoint / "config.json").read_text())
    assert config.d_model == 32


def test_existing_run_is_refused_without_resume(data, straight, capsys):
    with pytest.raises(RunExistsError, match="--resume"):
        run_pretraining(small_options(data, straight.run_dir))
    code = cli_main(["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(straight.run_dir),
                     "--max-steps", "2", "--device", "cpu"])
    assert code == 1 and "already holds a run" in capsys.readouterr().err


def test_resume_without_checkpoint_starts_and_says_so(data, tmp_path):
    out = tmp_path / "fresh"
    result = run_pretraining(small_options(data, out, max_steps=1, resume=True))
    assert result.step == 1 and result.checkpoint.name == "step-1"
    assert "no checkpoint" in (out / "train.log").read_text()


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(data, tmp_path, monkeypatch):
    original = E2EVLP.forward
    calls = {"n": 0}
    poisoned = {2}

    def forward(self, batch):
        calls["n"] += 1
        output = original(self, batch)
        if calls["n"] in poisoned:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(E2EVLP, "forward", forward)
    result = run_pretraining(small_options(data, tmp_path / "nan", max_steps=3))
    records = read_metrics(result.metrics_path)
    assert result.step == 3 and result.nonfinite_skipped == 1
    assert [r["step"] for r in records] == [1, 2, 3] and [r["nonfinite_skipped"] for r in records] == [0, 1, 1]
    assert "non-finite" in (tmp_path / "nan" / "train.log").read_text()

    calls["n"] = 0
    poisoned.clear()
    poisoned.update(range(2, 100))
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        run_pretraining(small_options(data, tmp_path / "nan2", max_steps=6, max_consecutive_nonfinite=3))


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    data = write_corpus(tmp_path, num_images=6, seed=1)
    images = sorted((data / "vg" / "images").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    exclude = tmp_path / "exclude.txt"
    # a bare number is a COCO image id: a Visual Genome image's own id leaves nothing out, nor a misspelt name
    exclude.write_text(f"{images[1].name}\nno_such_image.jpg\n{images[2].stem}\n")
    # 6 batches of 2 from 9 captioned train images (coco train + vg) visit every image at least once
    result = run_pretraining(small_options(data, tmp_path / "run", max_steps=6, exclude_images=exclude))
    records = read_metrics(result.metrics_path)
    assert records[-1]["skipped_records"] == 1 and result.skipped_records == 1
    assert all(b["skipped_records"] >= a["skipped_records"] for a, b in zip(records, records[1:]))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "unreadable" in log and images[0].name in log
    assert "left out 1 images listed in" in log and "2 of its 3 entries matched no image" in log
    assert f"no_such_image.jpg, {images[2].stem}" in log
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["images"] == 8 and run_info["exclusion"] == {
        "file": str(exclude), "sha256": hashlib.sha256(exclude.read_bytes()).hexdigest(), "left_out": 1,
        "entries": 3, "unmatched_entries": 2}


def test_a_visual_genome_copy_of_a_coco_image_shares_its_itm_key(tmp_path):
    from fastvlp.data.records import ImageRecord
    from fastvlp.train.pretrain_data import picture_key

    coco = ImageRecord("coco", 9, tmp_path / "a.jpg")
    vg_copy = ImageRecord("vg", 2417, tmp_path / "b.jpg", coco_id=9)
    vg_only = ImageRecord("vg", 9, tmp_path / "c.jpg")
    assert picture_key(coco) == picture_key(vg_copy) == "coco:9"
    assert picture_key(vg_only) == "vg:9" != picture_key(coco)


def test_objects_outside_the_label_space_are_counted_and_logged(tmp_path):
    """An object name missing from vg/objects_vocab.txt (as Visual Genome's names beyond its 1600 classes
    are) leaves the object out of the detection target: counted once per record in the metrics, named in the
    log."""
    data = write_corpus(tmp_path)
    for name, key in (("objects.json", "objects"), ("attributes.json", "attributes")):
        path = data / "vg" / name  # Visual Genome's stars get a name outside the vocabulary
        images = json.loads(path.read_text())
        for image in images:
            for obj in image[key]:
                obj["names"] = ["starfish" if n == "star" else n for n in obj["names"]]
        path.write_text(json.dumps(images))
    result = run_pretraining(small_options(data, tmp_path / "run", max_steps=6))
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    dropped = {int(index): count for index, count in state["dropped_objects"].items()}
    assert dropped  # 6 batches of 2 visit most of the images, and stars are common
    from fastvlp.train.pretrain_data import read_corpus

    records = read_corpus(data).records
    for index, count in dropped.items():
        assert records[index].source == "vg" and count == sum(o.name == "starfish" for o in records[index].objects)
    assert read_metrics(result.metrics_path)[-1]["dropped_objects"] == sum(dropped.values())
    log = (tmp_path / "run" / "train.log").read_text()
    from fastvlp.train.loop import NAMED_DROPPED_OBJECT_IMAGES

    assert log.count("objects left out of its detection target") == min(len(dropped), NAMED_DROPPED_OBJECT_IMAGES)
    assert f"{sum(dropped.values())} objects left out of detection targets" in log
