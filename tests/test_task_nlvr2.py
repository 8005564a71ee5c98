"""NLVR2 fine-tuning: logits and loss against a per-example float64 reference, gradients, evaluation with
and without labels, predict, a short run, and loading a pre-training checkpoint (a tiny model on a small
synthetic NLVR2)."""
import json
import math

import pytest
import torch
from safetensors.torch import save_model
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.data.images import load_rgb_image
from fastvlp.data.readers.nlvr2 import read_nlvr2
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.train.finetune import FinetuneOptions, run_finetuning
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.tasks.base import SeededSamples, collate_task_samples
from fastvlp.train.tasks.nlvr2 import Nlvr2Task
from fastvlp.train.tasks.weights import load_task_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 synthetic pairs (32 train, 8 dev, 8 test1 statements), plus ``test1`` with every other label
    removed and ``hidden`` (test1's statements) with none, as the unreleased test set has."""
    root = tmp_path_factory.mktemp("nlvr2_data")
    write_synthetic_dataset(root, 24, seed=2, datasets=("nlvr2",))
    rows = [json.loads(line) for line in (root / "nlvr2" / "test1.json").read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if i % 2:
            del row["label"]
    (root / "nlvr2" / "test1.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hidden = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    (root / "nlvr2" / "hidden.json").write_text("".join(json.dumps(r) + "\n" for r in hidden))
    return root


@pytest.fixture(scope="module")
def task():
    return Nlvr2Task()


@pytest.fixture(scope="module")
def training(task, data):
    return task.read_training_data(data, {})


@pytest.fixture(scope="module")
def tokenizer(task, training):
    return WordPieceTokenizer.train_on_texts(task.tokenizer_texts(training.records))


@pytest.fixture(scope="module")
def model(task, tokenizer):
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, **SMALL_MODEL)
    torch.manual_seed(0)
    model = task.build_model(config, {})
    with torch.no_grad():  # wider logits than a fresh head's, so that the statements get different answers
        model.head.classifier.output.weight.mul_(30.0)
    return model


def training_batch(task, training, tokenizer, size=4, epoch=0):
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), training.task_state), seed=5)
    return task.build_batch(collate_task_samples([dataset[(epoch, i)] for i in range(size)]), tokenizer, None)


def test_training_data_and_batch(task, training, tokenizer):
    assert len(training.records) == 32 and training.task_state == {}
    batch = training_batch(task, training, tokenizer)
    labels = [training.records[i].label for i in range(4)]
    assert batch["labels"].tolist() == [int(label) for label in labels]  # True = 1
    assert batch["left_images"].shape[0] == batch["right_images"].shape[0] == batch["input_ids"].shape[0] == 4
    unlabelled = task.build_batch({**collate_task_samples([SeededSamples(
        task.training_dataset(training.records, train_transform(SMALL_SCALE), {}))[(0, 0)]]), "label": [None]}, tokenizer, None)
    assert "labels" not in unlabelled


def test_logits_and_loss_match_a_per_example_float64_reference(task, training, tokenizer, model):
    batch = training_batch(task, training, tokenizer)
    model.eval()  # no dropout, batch norm on running statistics: each example's result is its own
    output = model(batch)
    with torch.no_grad():
        expected = torch.empty(4, 2, dtype=torch.float64)
        for i in range(4):
            ids = batch["input_ids"][i : i + 1, : int(batch["text_attention_mask"][i].sum())]
            mask = torch.ones_like(ids, dtype=torch.bool)
            left = model.vlp.encode(batch["left_images"][i : i + 1], batch["left_mask"][i : i + 1], ids, mask)
            right = model.vlp.encode(batch["right_images"][i : i + 1], batch["right_mask"][i : i + 1], ids, mask)
            expected[i] = model.head(left.cls_hidden, right.cls_hidden)[0].double()
    assert torch.allclose(output.logits.detach().double(), expected, atol=1e-3)
    assert expected.std() > 0.1
    labels = batch["labels"]
    reference = -torch.log_softmax(expected, dim=1)[torch.arange(4), labels].mean()
    assert output.losses["loss_nlvr2"] is output.loss
    assert float(output.loss.detach()) == pytest.approx(float(reference), rel=1e-4, abs=1e-5)
    # left and right are not interchangeable: the head reads them in order
    swapped = model.statement_logits(batch["right_images"], batch["right_mask"], batch["left_images"], batch["left_mask"],
                                     batch["input_ids"], batch["text_attention_mask"])
    assert not torch.allclose(swapped, output.logits, atol=1e-3)


def test_gradients_reach_the_head_encoder_and_backbone(task, training, tokenizer, model):
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(training_batch(task, training, tokenizer, epoch=1))
    loss = float(output.loss.detach())
    assert math.isfinite(loss) and loss > 0
    output.loss.backward()
    for name, parameter in (("head", model.head.classifier.dense.weight), ("encoder", model.vlp.encoder.layers[0].linear1.weight),
                            ("backbone", model.vlp.backbone.body.conv1.weight),
                            ("text embeddings", model.vlp.text_embeddings.word_embeddings.weight)):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def predict_record(task, model, tokenizer, record):
    transform = eval_transform(SMALL_SCALE)
    left, right = (transform(load_rgb_image(p)) for p in (record.left_image_path, record.right_image_path))
    return task.predict(model, tokenizer, [left.image, right.image], [left.original_size, right.original_size], record.sentence, 5)


def test_evaluate_on_dev_matches_predict_and_the_labels(task, model, tokenizer, data):
    model.eval()
    records = read_nlvr2(data / "nlvr2", "dev").records
    result = task.evaluate(model, tokenizer, data, "dev", CPU, 1, SMALL_SCALE)
    assert result.task == "nlvr2" and result.split == "dev" and result.num_examples == len(records) == 8
    assert [p["identifier"] for p in result.predictions] == [r.identifier for r in records]
    # one statement per batch has no padding, as in predict
    expected = [predict_record(task, model, tokenizer, r)["label"] for r in records]
    assert [p["prediction"] for p in result.predictions] == expected
    assert set(result.metrics) == {"accuracy"} and 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.metrics["accuracy"] == pytest.approx(sum(e == r.label for e, r in zip(expected, records)) / 8)
    assert result.notes == []
    batched = task.evaluate(model, tokenizer, data, "dev", CPU, 3, SMALL_SCALE)
    assert batched.num_examples == 8 and [p["identifier"] for p in batched.predictions] == [r.identifier for r in records]


def test_statements_without_a_label_are_predicted_but_not_scored(task, model, tokenizer, data):
    model.eval()
    result = task.evaluate(model, tokenizer, data, "test1", CPU, 4, SMALL_SCALE)
    records = read_nlvr2(data / "nlvr2", "test1").records
    labelled = [(p["prediction"], r.label) for p, r in zip(result.predictions, records) if r.label is not None]
    assert result.num_examples == 8 and len(labelled) == 4
    assert result.metrics["accuracy"] == pytest.approx(sum(p == label for p, label in labelled) / 4)
    assert any("4 of 8" in note and "not scored" in note for note in result.notes)
    hidden = task.evaluate(model, tokenizer, data, "hidden", CPU, 4, SMALL_SCALE)
    assert hidden.num_examples == 8 and hidden.metrics == {} and len(hidden.predictions) == 8
    assert any("accuracy not computed" in note for note in hidden.notes)


def test_predict_output_and_errors(task, model, tokenizer, data):
    model.eval()
    record = read_nlvr2(data / "nlvr2", "dev").records[0]
    output = predict_record(task, model, tokenizer, record)
    assert set(output) == {"task", "statement", "label", "probability"}
    assert output["task"] == "nlvr2" and output["statement"] == record.sentence
    transform = eval_transform(SMALL_SCALE)
    left, right = (transform(load_rgb_image(p)) for p in (record.left_image_path, record.right_image_path))
    ids = tokenizer.encode_batch([record.sentence])
    with torch.no_grad():
        logits = model.statement_logits(left.image[None], torch.zeros(1, *left.image.shape[1:], dtype=torch.bool),
                                        right.image[None], torch.zeros(1, *right.image.shape[1:], dtype=torch.bool),
                                        ids.input_ids, ids.attention_mask).double()
    assert output["probability"] == pytest.approx(float(torch.softmax(logits, 1)[0, 1]), abs=1e-5)
    assert output["label"] is (output["probability"] > 0.5)
    with pytest.raises(ValueError, match="left and a right image"):
        task.predict(model, tokenizer, [left.image], [left.original_size], record.sentence, 5)
    with pytest.raises(ValueError, match="statement"):
        task.predict(model, tokenizer, [left.image, right.image], [left.original_size, right.original_size], None, 5)


def test_short_finetuning_run_writes_a_checkpoint(data, tmp_path):
    options = FinetuneOptions(task="nlvr2", preset="tiny", data=data, out=tmp_path / "run", max_steps=2, batch_size=4,
                              progress=False, device="cpu", scale=SMALL_SCALE, config_overrides=dict(SMALL_MODEL))
    result = run_finetuning(options)
    assert result.step == 2 and result.checkpoint.name == "step-2"
    saved = json.loads((result.checkpoint / "task.json").read_text())
    assert saved["task"] == "nlvr2" and saved["preset"] == "tiny"
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss_nlvr2"]) and r["loss"] == r["loss_nlvr2"] for r in records)
    # the paper's 1e-4, x5 like tiny's pre-training rate, under step decay (milestones at 1 and 1.5 of 2 steps)
    assert records[0]["lr"] == pytest.approx(5e-4)


def test_pretraining_weights_load_with_a_new_head(model, tokenizer, tmp_path):
    pretrained = E2EVLP(model.config)
    save_model(pretrained, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(model.config.to_json())
    tokenizer.save(tmp_path / "tokenizer.json")
    task_model = Nlvr2Task().build_model(model.config, {})
    report = load_task_weights(task_model, tmp_path)
    head_keys = sorted(k for k in task_model.state_dict() if k.startswith("head."))
    assert report.new == head_keys and len(head_keys) == 6 and not report.mismatched
    assert any(k.startswith("vlp.decoder.") for k in report.unused) and any(k.startswith("vlp.mlm_head.") for k in report.unused)
    assert all(k.split(".")[1] not in ("backbone", "text_embeddings", "encoder") for k in report.unused)
    reference = pretrained.state_dict()
    for key, value in task_model.state_dict().items():
        if key.startswith("vlp."):
            assert torch.equal(value, reference[key[len("vlp."):]]), key
