"""``fastvlp demo`` end to end at a very small scale: what it writes, that its baselines and results are the
data's and the checkpoints', that an existing demo is refused without --resume, and that --resume on a
finished demo reports the same results without training again."""
import json

import pytest

from fastvlp.data.readers.vqa import read_vqa
from fastvlp.train.checkpoint import list_checkpoints
from fastvlp.train.demo import main, results_table
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.tasks.vqa import vqa_baselines

SMALL_DEMO = ["--num-images", "8", "--steps", "2", "--vqa-steps", "2", "--caption-steps", "2", "--batch-size", "2",
              "--finetune-batch-size", "2"]


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["--out", str(out), *SMALL_DEMO]) == 0
    return out


def test_the_demo_trains_every_run_to_its_last_step(demo):
    for run, steps in (("pretrain", 2), ("vqa", 2), ("caption", 2)):
        assert [r["step"] for r in read_metrics(demo / run / "metrics.jsonl")] == list(range(1, steps + 1))
        assert list_checkpoints(demo / run)[-1].name == f"step-{steps}"


def test_results_are_the_evaluations_and_the_baselines_come_from_the_data(demo):
    results = json.loads((demo / "results.json").read_text())
    for task in ("vqa", "caption"):
        evaluation = json.loads((demo / f"{task}_eval.json").read_text())
        assert results["model"][task] == evaluation["metrics"]
    assert 0.0 <= results["model"]["vqa"]["accuracy"] <= 1.0
    assert {"bleu4", "rouge_l", "cider"} <= set(results["model"]["caption"])
    data = demo / "data"
    expected = vqa_baselines(read_vqa(data / "vqa", data / "coco", "train").records,
                             read_vqa(data / "vqa", data / "coco", "val").records)
    assert results["baselines"]["vqa"] == pytest.approx(expected)
    # Every validation question is of one kind of the synthetic grammar, and each kind's figures are its own.
    kinds = results["vqa_question_kinds"]
    val = read_vqa(data / "vqa", data / "coco", "val").records
    assert sum(row["questions"] for row in kinds.values()) == len(val) and "background colour" in kinds
    assert all(0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["question_type_prior"] <= 1.0 for row in kinds.values())


def test_the_loss_plot_is_written(demo):
    pytest.importorskip("matplotlib")
    assert (demo / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_existing_demo_is_refused_without_resume_and_resumed_with_it(demo, capsys):
    before = {run: (demo / run / "metrics.jsonl").read_text() for run in ("pretrain", "vqa", "caption")}
    results = json.loads((demo / "results.json").read_text())
    assert main(["--out", str(demo), *SMALL_DEMO]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(demo), *SMALL_DEMO, "--resume"]) == 0
    assert {run: (demo / run / "metrics.jsonl").read_text() for run in before} == before  # nothing retrained
    assert json.loads((demo / "results.json").read_text()) == results


def test_bad_step_counts_are_refused(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_results_table_puts_each_answer_type_next_to_its_prior():
    table = results_table(
        {"vqa": {"accuracy": 0.41, "accuracy_number": 0.52, "accuracy_yes_no": 0.73}, "caption": {"cider": 0.61}},
        {"vqa": {"most_frequent_answer": 0.12, "question_type_prior": 0.23, "question_type_prior_number": 0.34,
                 "question_type_prior_yes_no": 0.45}, "caption": {"cider": 0.56}},
    )
    rows = {tuple(line.split()[:3]): line for line in table.splitlines()[2:]}
    assert rows[("vqa", "accuracy", "0.410")].endswith("most frequent answer 0.120, question-type prior 0.230")
    assert rows[("vqa", "number", "0.520")].endswith("question-type prior 0.340")
    assert rows[("vqa", "yes_no", "0.730")].endswith("question-type prior 0.450")
    assert rows[("caption", "cider", "0.610")].endswith("most frequent caption 0.560")
    assert len(rows) == 4


def test_results_table_adds_each_question_kind_next_to_its_prior():
    kinds = {"background colour": {"questions": 9, "accuracy": 0.87, "question_type_prior": 0.0},
             "count": {"questions": 4, "accuracy": 0.5, "question_type_prior": 0.25}}
    table = results_table({"vqa": {"accuracy": 0.41}}, {"vqa": {"most_frequent_answer": 0.12, "question_type_prior": 0.23}},
                          kinds)
    rows = {tuple(line.split()[:3]): line for line in table.splitlines()[2:]}
    assert rows[("vqa", "background_colour", "0.870")].endswith("question-type prior 0.000 (9 questions)")
    assert rows[("vqa", "count", "0.500")].endswith("question-type prior 0.250 (4 questions)")
    assert len(rows) == 3


def test_missing_weights_or_vocabulary_are_refused_before_anything_is_written(tmp_path, capsys):
    for option in ("--backbone-weights", "--vocab"):
        assert main(["--out", str(tmp_path / "out"), option, str(tmp_path / "absent.bin")]) == 2
        assert f"{option}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_and_vocabulary_reach_pre_training(tmp_path, monkeypatch, capsys):
    import fastvlp.train.pretrain as pretrain

    out = tmp_path / "out"
    for name in ("coco", "vg", "vqa"):  # data already there: nothing is synthesised
        (out / "data" / name).mkdir(parents=True)
    weights, vocab = tmp_path / "resnet50.pth", tmp_path / "vocab.txt"
    weights.write_bytes(b"weights")
    vocab.write_text("[PAD]\n")
    seen = []

    def stop_at_pre_training(options):
        seen.append(options)
        raise ValueError("stopped before training")

    monkeypatch.setattr(pretrain, "run_pretraining", stop_at_pre_training)
    assert main(["--out", str(out), "--preset", "e2e-vlp-6-r50", "--backbone-weights", str(weights),
                 "--vocab", str(vocab)]) == 1
    assert "stopped before training" in capsys.readouterr().err
    assert (seen[0].preset, seen[0].backbone_weights, seen[0].vocab) == ("e2e-vlp-6-r50", weights, vocab)
