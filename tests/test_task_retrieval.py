"""Retrieval fine-tuning: the cross-encoder's training loss against a per-pair float64 reference, hard
negatives, the evaluation score matrix against a per-pair loop, predict, a short run, and loading a
pre-training checkpoint (a tiny model on a small synthetic Flickr30k)."""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_model
from torch.nn import functional as F
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.data.images import load_rgb_image
from fastvlp.data.readers.karpathy import read_flickr30k
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.eval.retrieval import retrieval_recall
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.train.finetune import FinetuneOptions, run_finetuning
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.tasks.base import SeededSamples, collate_task_samples
from fastvlp.train.tasks.retrieval import METRIC_KEYS, RetrievalTask, mine_hard_negatives
from fastvlp.train.tasks.weights import load_task_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_data")
    write_synthetic_dataset(root, 24, seed=1, datasets=("flickr30k",))
    # Test images 0 and 1 of one size, so that evaluation batches an equal-size group through the backbone;
    # 2 square and 3 wide, so that their feature maps (2 x 2, 1 x 3) differ in size from the others' (3 x 2)
    # and images with different token counts share encoder passes.
    records = read_flickr30k(root / "flickr30k", splits=["test"]).records
    width, height = Image.open(records[0].image_path).size
    for record, size in zip(records[1:], ((width, height), (120, 120), (240, 80))):
        Image.open(record.image_path).convert("RGB").resize(size).save(record.image_path)
    return root


@pytest.fixture(scope="module")
def task():
    return RetrievalTask()


@pytest.fixture(scope="module")
def training(task, data):
    return task.read_training_data(data, {})


@pytest.fixture(scope="module")
def tokenizer(task, training):
    return WordPieceTokenizer.train_on_texts(task.tokenizer_texts(training.records))


@pytest.fixture(scope="module")
def model(task, training, tokenizer):
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, **SMALL_MODEL)
    torch.manual_seed(0)
    model = task.build_model(config, {"num_negatives": 3})
    # A wider score range than a fresh head's, so that pairs (and the loss's two directions) differ clearly,
    # yet short of saturating the sigmoid: the score logits of a training batch get a spread of 2.
    batch = training_batch(task, training, tokenizer)
    with torch.no_grad():
        encoded = model.vlp.encode(batch["images"], batch["pixel_mask"], batch["input_ids"], batch["text_attention_mask"])
        logits = model.head.score(encoded.cls_hidden)
        model.head.score.weight.mul_(2.0 / logits.std().clamp(min=1e-6))
    return model


def training_batch(task, training, tokenizer, size=4, epoch=0):
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), training.task_state), seed=5)
    return task.build_batch(collate_task_samples([dataset[(epoch, i)] for i in range(size)]), tokenizer, None)


def pair_score(model, visual, tokenizer, text):
    encoded_text = tokenizer.encode_batch([text])
    encoded = model.vlp.encode(None, None, encoded_text.input_ids, encoded_text.attention_mask, visual_tokens=visual)
    return model.head(encoded.cls_hidden)[0].double()


def circle_reference(positive, negative, margin=0.25, gamma=32.0):
    alpha_p = (1 + margin - positive).clamp(min=0)
    alpha_n = (negative + margin).clamp(min=0)
    logits = torch.logsumexp(gamma * alpha_n * (negative - margin), 1) - gamma * alpha_p * (positive - (1 - margin))
    return F.softplus(logits).mean()


def test_training_samples_draw_one_of_the_image_captions(task, training, data):
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), training.task_state), seed=5)
    drawn = {dataset[(epoch, 0)]["caption"] for epoch in range(12)}
    assert drawn <= set(training.records[0].captions) and len(drawn) > 1
    assert dataset[(3, 2)]["caption"] == dataset[(3, 2)]["caption"]  # seeded by (seed, epoch, index)
    assert training.task_state == {"num_negatives": 3}
    assert task.read_training_data(data, {"num_negatives": 2}).task_state == {"num_negatives": 2}
    with pytest.raises(ValueError, match="num_negatives"):
        task.read_training_data(data, {"num_negatives": 0})


def test_loss_matches_a_per_pair_float64_reference(task, training, tokenizer, model):
    batch = training_batch(task, training, tokenizer)
    model.eval()  # no dropout, batch norm on running statistics: every pair scores the same in any batch
    output = model(batch)
    size, k = 4, 3
    with torch.no_grad():
        grid = torch.empty(size, size, dtype=torch.float64)
        for i in range(size):
            visual = model.vlp.extract_visual_tokens(batch["images"][i : i + 1], batch["pixel_mask"][i : i + 1])
            for j in range(size):
                ids = batch["input_ids"][j : j + 1, : int(batch["text_attention_mask"][j].sum())]
                encoded = model.vlp.encode(None, None, ids, torch.ones_like(ids, dtype=torch.bool), visual_tokens=visual)
                grid[i, j] = model.head(encoded.cls_hidden)[0].double()
    assert torch.allclose(output.logits.double(), grid, atol=1e-3)
    similarity = torch.sigmoid(grid)
    rows = torch.arange(size)

    def hardest(matrix):  # brute force: each row's off-diagonal columns sorted by score
        return torch.tensor([sorted((c for c in range(size) if c != r), key=lambda c: -matrix[r, c])[:k] for r in range(size)])

    text_negatives, image_negatives = hardest(grid), hardest(grid.t())
    expected = (circle_reference(similarity.diagonal(), similarity[rows[:, None], text_negatives])
                + circle_reference(similarity.diagonal(), similarity[image_negatives, rows[:, None]])) / 2
    assert output.loss.dtype == torch.float32 and output.losses["loss_retrieval"] is output.loss
    assert float(output.loss.detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_gradients_reach_the_head_encoder_and_backbone(task, training, tokenizer, model):
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(training_batch(task, training, tokenizer, epoch=1))
    loss = float(output.loss.detach())
    assert math.isfinite(loss) and loss > 0
    output.loss.backward()
    for name, parameter in (("head", model.head.score.weight), ("encoder", model.vlp.encoder.layers[0].linear1.weight),
                            ("backbone", model.vlp.backbone.body.conv1.weight),
                            ("text embeddings", model.vlp.text_embeddings.word_embeddings.weight)):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_contrastive_loss_is_added_with_its_weight(task, training, tokenizer, model):
    config = model.config.replace(contrastive_loss_weight=0.5, contrastive_dim=8)
    aligned = task.build_model(config, {"num_negatives": 3})
    aligned.load_state_dict(model.state_dict(), strict=False)  # the same weights, plus a contrastive head
    aligned.eval()
    batch = training_batch(task, training, tokenizer)
    output = aligned(batch)
    with torch.no_grad():
        visual = aligned.vlp.extract_visual_tokens(batch["images"], batch["pixel_mask"])
        expected = aligned.vlp.contrastive_loss(visual, batch["input_ids"], batch["text_attention_mask"], batch["image_ids"])
        plain = model.eval()(batch)
    assert float(output.losses["loss_contrastive"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(output.losses["loss_retrieval"].detach()) == pytest.approx(float(plain.loss.detach()), rel=1e-5)
    assert float(output.loss.detach()) == pytest.approx(float(plain.loss.detach()) + 0.5 * float(expected), rel=1e-5)
    assert "loss_contrastive" not in plain.losses
    aligned.train()
    output = aligned(training_batch(task, training, tokenizer, epoch=1))
    output.losses["loss_contrastive"].backward()
    for name, parameter in (("projection", aligned.vlp.contrastive_head.image_projection.weight),
                            ("backbone", aligned.vlp.backbone.body.conv1.weight)):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_small_batches_clip_the_negatives_and_a_single_image_is_refused(task, training, tokenizer, model):
    model.eval()
    output = model(training_batch(task, training, tokenizer, size=2))  # num_negatives 3 -> 1
    assert output.logits.shape == (2, 2) and math.isfinite(float(output.loss.detach()))
    with pytest.raises(ValueError, match="at least 2 images"):
        model(training_batch(task, training, tokenizer, size=1))


def test_hard_negatives_never_pick_the_positive():
    generator = torch.Generator().manual_seed(11)
    for size, k in ((2, 1), (5, 4), (7, 3)):
        scores = torch.randn(size, size, generator=generator, dtype=torch.float64)
        scores.diagonal().add_(10.0)  # the positives score highest, as a trained model's do
        for negatives, matrix in zip(mine_hard_negatives(scores, k), (scores, scores.t())):
            assert negatives.shape == (size, k)
            for row in range(size):
                assert row not in negatives[row].tolist()
                others = sorted((c for c in range(size) if c != row), key=lambda c: -matrix[row, c])
                assert negatives[row].tolist() == others[:k]
    # rows holding the same image are positives of each other: ranked after every true negative
    scores = torch.randn(6, 6, generator=generator)
    scores[0, 2] = scores[2, 0] = 50.0
    text_negatives, image_negatives = mine_hard_negatives(scores, 4, torch.tensor([7, 8, 7, 9, 10, 11]))
    assert 2 not in text_negatives[0].tolist() and 0 not in text_negatives[2].tolist()
    assert 2 not in image_negatives[0].tolist() and 0 not in image_negatives[2].tolist()
    with pytest.raises(ValueError, match="image_ids"):
        mine_hard_negatives(scores, 2, torch.tensor([1, 2]))


@pytest.fixture(scope="module")
def brute_force(model, tokenizer, data):
    """Every (image, caption) pair of the test split scored one at a time, each image alone."""
    model.eval()
    records = read_flickr30k(data / "flickr30k", splits=["test"]).records
    texts = [c for r in records for c in r.captions]
    scores = torch.empty(len(records), len(texts), dtype=torch.float64)
    with torch.no_grad():
        for i, record in enumerate(records):
            image = eval_transform(SMALL_SCALE)(load_rgb_image(record.image_path)).image[None]
            visual = model.vlp.extract_visual_tokens(image, torch.zeros(1, *image.shape[2:], dtype=torch.bool))
            for j, text in enumerate(texts):
                scores[i, j] = pair_score(model, visual, tokenizer, text)
    text_to_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    return records, scores, text_to_image


@pytest.mark.parametrize("batch_size", [3, 64])  # 1 image x 3 captions per pass; 2 images x 20 captions
def test_score_matrix_matches_a_per_pair_loop(task, model, tokenizer, brute_force, batch_size):
    records, expected, text_to_image = brute_force
    scores, mapping, kept = task.score_matrix(model, tokenizer, records, CPU, batch_size, SMALL_SCALE)
    assert kept == list(range(len(records))) and torch.equal(mapping, text_to_image)
    assert scores.shape == expected.shape == (4, 20)
    assert torch.allclose(scores.double(), expected, atol=1e-3)
    assert scores.std() > 0.1  # the pairs are told apart


def test_evaluate_reports_recall_of_the_score_matrix(task, model, tokenizer, data, brute_force):
    records, expected, text_to_image = brute_force
    result = task.evaluate(model, tokenizer, data, "test", CPU, 8, SMALL_SCALE)
    assert result.task == "retrieval" and result.split == "test" and result.predictions is None
    assert result.num_examples == len(records) == 4
    assert set(result.metrics) == set(METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    reference = retrieval_recall(expected, text_to_image)
    assert result.metrics == pytest.approx({k: reference[k] for k in METRIC_KEYS})
    assert result.metrics["img_r5"] == result.metrics["img_r10"] == 1.0  # 4 images: each caption's is in its top 5


def test_predict_scores_one_pair(task, model, tokenizer, brute_force):
    records, expected, _ = brute_force
    image = eval_transform(SMALL_SCALE)(load_rgb_image(records[1].image_path))
    text = records[0].captions[2]
    output = task.predict(model, tokenizer, [image.image], [image.original_size], text, 5)
    assert set(output) == {"task", "text", "score"} and output["task"] == "retrieval" and output["text"] == text
    assert output["score"] == pytest.approx(float(torch.sigmoid(expected[1, 2])), abs=1e-5)
    with pytest.raises(ValueError, match="text"):
        task.predict(model, tokenizer, [image.image], [image.original_size], None, 5)
    with pytest.raises(ValueError, match="images"):
        task.predict(model, tokenizer, [], [], text, 5)


def test_short_finetuning_run_writes_a_checkpoint(data, tmp_path):
    options = FinetuneOptions(task="retrieval", preset="tiny", data=data, out=tmp_path / "run", max_steps=2,
                              batch_size=4, progress=False, device="cpu", scale=SMALL_SCALE,
                              config_overrides=dict(SMALL_MODEL), task_options={"num_negatives": 2})
    result = run_finetuning(options)
    assert result.step == 2 and result.checkpoint.name == "step-2"
    saved = json.loads((result.checkpoint / "task.json").read_text())
    assert saved["task"] == "retrieval" and saved["num_negatives"] == 2 and saved["preset"] == "tiny"
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2]
    # tiny's retrieval adds the contrastive loss with weight 1
    assert all(math.isfinite(r["loss_retrieval"]) and math.isfinite(r["loss_contrastive"]) for r in records)
    assert all(r["loss"] == pytest.approx(r["loss_retrieval"] + r["loss_contrastive"], rel=1e-6) for r in records)
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["contrastive_loss_weight"] == 1.0 and config["contrastive_dim"] == 64
    # linear warm-up and decay (no step decay) at the paper's 5e-5, x5 like tiny's pre-training rate
    assert records[0]["lr"] == pytest.approx(5 * 5e-5)


def test_pretraining_weights_load_with_a_new_head(model, tokenizer, tmp_path):
    pretrained = E2EVLP(model.config)
    save_model(pretrained, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(model.config.to_json())
    tokenizer.save(tmp_path / "tokenizer.json")
    task_model = RetrievalTask().build_model(model.config, {})
    report = load_task_weights(task_model, tmp_path)
    assert report.new == sorted(k for k in task_model.state_dict() if k.startswith("head."))
    assert report.new == ["head.score.bias", "head.score.weight"] and not report.mismatched
    assert any(k.startswith("vlp.decoder.") for k in report.unused) and any(k.startswith("vlp.mlm_head.") for k in report.unused)
    assert all(k.split(".")[1] not in ("backbone", "text_embeddings", "encoder") for k in report.unused)
    reference = pretrained.state_dict()
    for key, value in task_model.state_dict().items():
        if key.startswith("vlp."):
            assert torch.equal(value, reference[key[len("vlp."):]]), key
