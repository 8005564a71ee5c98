"""Detection fine-tuning (COCO instances, paired captions): data, model, losses, COCO AP evaluation,
prediction, a short run and loading a pre-training checkpoint, on a small synthetic set (CPU)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_model
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.data.readers.coco import read_coco_instances
from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.outputs import DetectionOutput
from fastvlp.inference import Predictor
from fastvlp.models.presets import get_preset
from fastvlp.train.finetune import FinetuneOptions, run_finetuning
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.tasks import get_task
from fastvlp.train.tasks.base import SeededSamples, collate_task_samples
from fastvlp.train.tasks.detection import DetectionModel, DetectionTask, postprocess_detections
from fastvlp.train.tasks.weights import load_task_weights

AP_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection") / "data"
    write_synthetic_dataset(root, 24, seed=0, datasets=("coco",))
    return root


@pytest.fixture(scope="module")
def task():
    return get_task("detection")


@pytest.fixture(scope="module")
def training(data, task):
    return task.read_training_data(data, {})


@pytest.fixture(scope="module")
def tokenizer(training, task):
    return WordPieceTokenizer.train_on_texts(task.tokenizer_texts(training.records))


@pytest.fixture(scope="module")
def config(tokenizer):
    return get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                      max_text_len=tokenizer.max_length, **SMALL_MODEL)


def build_model(config, training, with_text, seed=0):
    torch.manual_seed(seed)
    return DetectionModel(config, {**training.task_state, "with_text": with_text})


def training_batch(task, training, tokenizer, with_text, size=4):
    state = {**training.task_state, "with_text": with_text}
    samples = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), state), seed=1)
    return task.build_batch(collate_task_samples([samples[(0, i)] for i in range(size)]), tokenizer, None)


def test_training_data_categories_and_captions(data, training):
    assert isinstance(get_task("detection"), DetectionTask)
    published = json.loads((data / "coco" / "annotations" / "instances_train.json").read_text())
    assert training.task_state == {"categories": [{"id": c["id"], "name": c["name"]} for c in published["categories"]],
                                   "with_text": True}
    assert [c["id"] for c in training.task_state["categories"]] == [1, 2, 4, 5, 7, 9]  # COCO's order, not sorted by name
    captions = json.loads((data / "coco" / "annotations" / "captions_train.json").read_text())["annotations"]
    expected = {}
    for entry in captions:
        expected.setdefault(entry["image_id"], []).append(entry["caption"])
    assert {r.image_id: list(r.captions) for r in training.records} == expected
    assert all(r.objects for r in training.records)


def test_images_without_caption_are_skipped_and_crowds_dropped(data, task, tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    os.symlink(data / "coco" / "images", coco / "images")
    instances = json.loads((data / "coco" / "annotations" / "instances_train.json").read_text())
    captions = json.loads((data / "coco" / "annotations" / "captions_train.json").read_text())
    uncaptioned = captions["images"][0]["id"]
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] != uncaptioned]
    crowd = instances["annotations"][-1]
    crowd["iscrowd"] = 1
    (coco / "annotations" / "instances_train.json").write_text(json.dumps(instances))
    (coco / "annotations" / "captions_train.json").write_text(json.dumps(captions))

    with_text = task.read_training_data(tmp_path, {"with_text": True})
    without = task.read_training_data(tmp_path, {"with_text": False})
    assert uncaptioned not in {r.image_id for r in with_text.records}
    assert with_text.skips["no_annotations"] == 1 and without.skips["no_annotations"] == 0
    assert len(without.records) == len(instances["images"]) and all(not r.captions for r in without.records)
    assert without.task_state["with_text"] is False
    crowd_image = next(r for r in without.records if r.image_id == crowd["image_id"])
    kept = [a for a in instances["annotations"] if a["image_id"] == crowd["image_id"] and not a["iscrowd"]]
    assert [o.object_id for o in crowd_image.objects] == [a["id"] for a in kept]


def test_samples_carry_labels_boxes_and_a_caption(training, task):
    state = training.task_state
    dataset = task.training_dataset(training.records, eval_transform(SMALL_SCALE), state)
    label_of = {c["id"]: index for index, c in enumerate(state["categories"])}
    for index in (0, 3):
        record, sample = training.records[index], SeededSamples(dataset, seed=5)[(0, index)]
        assert sample["labels"].tolist() == [label_of[o.category_id] for o in record.objects]
        height, width = sample["original_size"]
        x0, y0, x1, y1 = torch.tensor([o.box for o in record.objects], dtype=torch.float64).unbind(1)
        expected = torch.stack(((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height), 1)
        torch.testing.assert_close(sample["boxes"].double(), expected, atol=1e-5, rtol=0)
        assert sample["caption"] in record.captions and sample["image_id"] == record.image_id
    # the caption is drawn under SeededSamples' seed: the same (epoch, index) gives the same one
    drawn = [SeededSamples(dataset, seed=5)[(epoch, 0)]["caption"] for epoch in range(12)]
    assert drawn == [SeededSamples(dataset, seed=5)[(epoch, 0)]["caption"] for epoch in range(12)]
    assert len(set(drawn)) > 1


def test_head_is_new_over_the_categories(config, training):
    model = build_model(config, training, with_text=True)
    assert model.head is model.vlp.detection_heads
    assert model.head.class_embed.out_features == len(training.task_state["categories"]) + 1
    assert model.head.attribute_embed is None and model.vlp.criterion.num_classes == 6
    assert model.vlp.mlm_head is None and model.vlp.itm_head is None and model.vlp.caption_head is None
    with pytest.raises(ValueError, match="categories"):
        DetectionModel(config, {"categories": []})
    with pytest.raises(ValueError, match="unique"):
        DetectionModel(config, {"categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]})


@pytest.mark.parametrize("with_text", [True, False])
def test_forward_backward(config, training, tokenizer, task, with_text, one_thread):
    model = build_model(config, training, with_text)
    batch = training_batch(task, training, tokenizer, with_text)
    assert ("input_ids" in batch) == with_text and len(batch["targets"]) == 4
    calls = []
    model.vlp.text_embeddings.register_forward_hook(lambda *args: calls.append(1))
    output = model(batch)
    assert torch.isfinite(output.loss) and output.loss > 0
    assert output.logits.shape == (4, config.num_queries, 7)
    assert set(output.losses) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
    output.loss.backward()
    for parameter in (model.head.class_embed.weight, model.head.bbox_embed.layers[-1].weight,
                      model.vlp.encoder.layers[0].linear1.weight, model.vlp.query_embed.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    text_grads = [p.grad for p in model.vlp.text_embeddings.parameters()]
    if with_text:
        assert len(calls) == 1 and model.vlp.text_embeddings.word_embeddings.weight.grad.abs().sum() > 0
    else:
        assert calls == [] and all(g is None for g in text_grads)


def test_loss_is_the_criterion_total_and_text_changes_it(config, training, tokenizer, task, one_thread):
    model = build_model(config, training, with_text=True).eval()
    image_only = build_model(config, training, with_text=False).eval()
    image_only.load_state_dict(model.state_dict())
    batch = training_batch(task, training, tokenizer, with_text=True)
    with torch.no_grad():
        loss = model(batch).loss
        encoded = model.vlp.encode(batch["images"], batch["pixel_mask"], batch["input_ids"], batch["text_attention_mask"])
        outputs = model.vlp.detect(encoded)
        criterion = model.vlp.criterion
        expected = criterion.weighted_total(criterion(outputs.as_dict(), batch["targets"]))
        alone = image_only(batch).loss  # the same weights, the captions left out
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(alone.item() - loss.item()) > 1e-4


def test_token_head_and_two_stage_queries_train_and_predict(config, training, tokenizer, task, one_thread):
    two_stage = config.replace(anchor_queries=True, token_detection_loss_weight=0.5, two_stage=True)
    model = build_model(two_stage, training, with_text=True)
    assert model.vlp.token_detection_head.num_classes == 6  # COCO's categories, not pre-training's
    batch = training_batch(task, training, tokenizer, with_text=True)
    output = model(batch)
    assert set(output.losses) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_token",
                                  "loss_token_ce", "loss_token_bbox", "loss_token_giou"}
    with torch.no_grad():
        encoded = model.vlp.encode(batch["images"], batch["pixel_mask"], batch["input_ids"], batch["text_attention_mask"])
        criterion = model.vlp.criterion
        detr = criterion.weighted_total(criterion(model.vlp.detect(encoded).as_dict(), batch["targets"]))
    assert output.loss.item() == pytest.approx(detr.item() + 0.5 * output.losses["loss_token"].item(), rel=1e-5)
    output.loss.backward()
    for parameter in (model.vlp.token_detection_head.class_embed.weight, model.vlp.token_detection_head.box_embed.layers[-1].weight,
                      model.head.bbox_embed.layers[-1].weight, model.vlp.query_anchors.position_mlp.layers[0].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        predicted = model.detection_outputs(batch["images"], batch["pixel_mask"], batch["input_ids"],
                                            batch["text_attention_mask"])
    assert predicted.pred_boxes.shape == (4, two_stage.num_queries, 4) and torch.isfinite(predicted.pred_boxes).all()


def test_postprocess_matches_detr(one_thread):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64) * 3
    boxes = torch.rand(2, 7, 4, generator=generator, dtype=torch.float64)
    boxes[0, 0] = torch.tensor([0.05, 0.9, 0.3, 0.4], dtype=torch.float64)  # reaches outside the image
    scores, labels, clipped = postprocess_detections(logits, boxes)
    probabilities = torch.exp(logits - torch.logsumexp(logits, -1, keepdim=True))
    torch.testing.assert_close(scores.double(), probabilities[..., :-1].max(-1).values, atol=1e-6, rtol=0)
    assert torch.equal(labels, probabilities[..., :-1].argmax(-1))
    torch.testing.assert_close(clipped[0, 0].double(), torch.tensor([0.1, 0.85, 0.2, 0.3], dtype=torch.float64), atol=1e-6, rtol=0)
    inside = (boxes[..., :2] - boxes[..., 2:] / 2 >= 0) & (boxes[..., :2] + boxes[..., 2:] / 2 <= 1)
    keep = inside.all(-1)
    torch.testing.assert_close(clipped[keep].double(), boxes[keep], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pred_boxes"):
        postprocess_detections(logits, boxes[:, :3])


def test_evaluate_gives_coco_ap_and_results(config, training, tokenizer, task, data, one_thread):
    model = build_model(config, training, with_text=True)
    result = task.evaluate(model, tokenizer, data, "val", torch.device("cpu"), 4, SMALL_SCALE)
    records = read_coco_instances(data / "coco", "val").records
    assert result.task == "detection" and result.split == "val" and result.num_examples == len(records)
    assert set(result.metrics) == set(AP_KEYS)
    assert all(v is None or 0 <= v <= 1 for v in result.metrics.values())
    undefined = [key for key, value in result.metrics.items() if value is None]
    assert all(key.startswith("ap_") for key in undefined)  # only a size class can lack objects
    assert bool(undefined) == any("undefined (null)" in note for note in result.notes)
    assert len(result.predictions) == len(records) * config.num_queries
    sizes = {r.image_id: (r.height, r.width) for r in records}
    category_ids = {c["id"] for c in training.task_state["categories"]}
    for detection in result.predictions:
        x, y, w, h = detection["bbox"]
        height, width = sizes[detection["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6
        assert detection["category_id"] in category_ids and 0 < detection["score"] < 1


def test_ground_truth_predictions_score_ap_one(config, training, tokenizer, task, data, one_thread):
    """The evaluation path, fed queries that equal the ground truth (confident) plus confident no-object
    queries with random boxes, gives AP 1."""
    records = list(read_coco_instances(data / "coco", "val").records)
    queue = list(records)
    num_queries = max(len(r.objects) for r in records) + 2
    generator = torch.Generator().manual_seed(0)

    def ground_truth_outputs(images, pixel_mask, input_ids=None, text_attention_mask=None, *, aux_outputs=None):
        batch = [queue.pop(0) for _ in range(images.shape[0])]
        logits = torch.zeros(len(batch), num_queries, 7)
        logits[..., -1] = 12.0
        boxes = torch.rand(len(batch), num_queries, 4, generator=generator) * 0.5 + 0.1
        for row, record in enumerate(batch):
            for query, obj in enumerate(record.objects):
                x0, y0, x1, y1 = obj.box
                w, h = record.width, record.height
                boxes[row, query] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
                logits[row, query, -1] = 0.0
                logits[row, query, model.category_ids.index(obj.category_id)] = 12.0
        return DetectionOutput(logits, boxes)

    model = build_model(config, training, with_text=True)
    model.detection_outputs = ground_truth_outputs
    result = task.evaluate(model, tokenizer, data, "val", torch.device("cpu"), 4, SMALL_SCALE)
    assert not queue
    assert result.metrics["ap"] == pytest.approx(1.0, abs=1e-6)
    assert result.metrics["ap50"] == pytest.approx(1.0, abs=1e-6) and result.metrics["ap75"] == pytest.approx(1.0, abs=1e-6)
    sizes = [result.metrics[k] for k in ("ap_small", "ap_medium", "ap_large")]
    assert any(value is not None for value in sizes)
    assert all(value is None or value == pytest.approx(1.0, abs=1e-6) for value in sizes)


@pytest.mark.parametrize("with_text", [True, False])
def test_predict_top_k_in_original_pixels(config, training, tokenizer, task, data, with_text, one_thread):
    model = build_model(config, training, with_text).eval()
    record = read_coco_instances(data / "coco", "val").records[0]
    dataset = task.training_dataset([record], eval_transform(SMALL_SCALE), {**training.task_state, "with_text": with_text})
    sample = dataset[0]
    caption = "a red circle" if with_text else None
    answer = task.predict(model, tokenizer, [sample["image"]], [sample["original_size"]], caption, top_k=3)
    assert answer["task"] == "detection" and len(answer["detections"]) == 3
    scores = [d["score"] for d in answer["detections"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    names = {c["id"]: c["name"] for c in training.task_state["categories"]}
    height, width = sample["original_size"]
    for detection in answer["detections"]:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert names[detection["category_id"]] == detection["label"]
    # the highest score equals the best query's DETR score computed from the model's own outputs
    with torch.no_grad():
        input_ids = attention = None
        if with_text:
            encoded = tokenizer.encode_batch([caption])
            input_ids, attention = encoded.input_ids, encoded.attention_mask
        outputs = model.detection_outputs(sample["image"][None], torch.zeros(1, *sample["image"].shape[1:], dtype=torch.bool),
                                          input_ids, attention, aux_outputs=False)
    best = postprocess_detections(outputs.pred_logits, outputs.pred_boxes)[0].max().item()
    assert scores[0] == pytest.approx(best, abs=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        task.predict(model, tokenizer, [sample["image"]], [sample["original_size"]], caption, top_k=0)


def test_two_step_finetuning_writes_task_file(data, training, tmp_path, one_thread):
    options = FinetuneOptions(task="detection", preset="tiny", data=data, out=tmp_path / "run", max_steps=2, batch_size=4,
                              progress=False, config_overrides=dict(SMALL_MODEL), scale=SMALL_SCALE, device="cpu")
    result = run_finetuning(options)
    assert result.step == 2 and result.checkpoint is not None
    saved = json.loads((result.checkpoint / "task.json").read_text())
    assert saved["task"] == "detection" and saved["with_text"] is True
    assert saved["categories"] == training.task_state["categories"]
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(record[k] is not None and record[k] >= 0 for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
        # one decoder layer (no auxiliary terms): DETR's weights 5 and 2 for the boxes, and tiny's detection
        # fine-tuning weighs the class 2 and adds the token head's loss with weight 1
        assert record["loss"] == pytest.approx(2 * record["loss_ce"] + 5 * record["loss_bbox"] + 2 * record["loss_giou"]
                                               + record["loss_token"], rel=1e-5)
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["class_loss_weight"] == 2.0 and config["match_cost_class"] == 2.0 and config["backbone_output"] == "dc5"
    assert config["anchor_queries"] and config["two_stage"] and config["token_detection_loss_weight"] == 1.0
    assert config["num_queries"] == SMALL_MODEL["num_queries"]  # --set wins over the preset's 10
    log = (result.run_dir / "train.log").read_text()
    assert ("tiny's fine-tuning for detection sets match_cost_class=2.0, class_loss_weight=2.0, backbone_output=dc5, "
            "anchor_queries=True, token_detection_loss_weight=1.0, two_stage=True\n") in log
    # the paper's 1e-4, x5 like tiny's pre-training rate; tiny drops it tenfold after 0.9 of the run, which
    # two steps do not reach (DETR's two thirds would have dropped it for the second)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(5e-4)
    assert "tiny's fine-tuning for detection drops the rate tenfold after 0.9 of the run\n" in log

    # the checkpoint loads back strictly (its config has the new head's classes) and predicts
    predictor = Predictor.from_checkpoint(result.checkpoint, device="cpu")
    assert predictor.model.config.num_classes == 6 and predictor.model.config.num_attributes == 0
    image = training.records[0].image_path
    answer = predictor.predict(image, text=training.records[0].captions[0], top_k=2)
    assert len(answer["detections"]) == 2 and answer["detections"][0]["label"] in {c["name"] for c in saved["categories"]}


@pytest.fixture(scope="module")
def pretraining_checkpoint(config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(11)
    model = E2EVLP(config.replace(num_classes=10, num_attributes=5))
    save_model(model, str(directory / "model.safetensors"))
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def test_pretraining_checkpoint_loads_all_but_the_classifier(config, training, pretraining_checkpoint):
    directory, weights = pretraining_checkpoint
    model = build_model(config, training, with_text=True)
    report = load_task_weights(model, directory)
    # The classifier is new (and, without a label space in the checkpoint, no row of it is copied); the box
    # MLP does not depend on the classes and loads as it is.
    for key in ("class_embed.weight", "class_embed.bias"):
        assert "vlp.detection_heads." + key in report.new
        assert "vlp.detection_heads." + key in report.unused
    assert report.rows_from_pretraining == [] and report.mismatched == []
    assert {k for k in report.loaded if k.startswith("vlp.detection_heads.")} == {
        "vlp." + k for k in weights if k.startswith("detection_heads.bbox_embed.")}
    assert any(k.startswith("vlp.detection_heads.attribute_embed") for k in report.unused)
    for head in ("mlm_head", "itm_head", "caption_head"):
        assert any(k.startswith(f"vlp.{head}.") for k in report.unused)
    assert not any(k.startswith(("vlp.encoder.", "vlp.decoder.", "vlp.backbone.")) for k in report.new)
    state = model.state_dict()
    for key in ("encoder.layers.0.linear1.weight", "decoder.layers.0.linear2.bias", "query_embed.weight",
                "detection_heads.bbox_embed.layers.2.weight"):
        assert torch.equal(state["vlp." + key], weights[key])
    assert model.head.class_embed.weight.shape == (7, config.d_model)


def test_pretraining_classifier_rows_carry_over_by_name(config, training, pretraining_checkpoint, tmp_path):
    directory, weights = pretraining_checkpoint
    # Pre-training's label space: ten classes, four of them the detection categories' names (one under an
    # alternative name, one in other case, in another order); "circle" and "pentagon" are not among them.
    vocab = ["dog", "Square", "tree", "star", "box,diamond", "cat", "triangle", "car", "bus", "sky"]
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "objects_vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    fresh = build_model(config, training, with_text=True).head.class_embed
    model = build_model(config, training, with_text=True)
    report = load_task_weights(model, tmp_path)
    names = [c["name"] for c in training.task_state["categories"]]
    assert names == ["circle", "square", "triangle", "diamond", "pentagon", "star"]
    assert report.rows_from_pretraining == ["square", "triangle", "diamond", "star"]
    assert "classifier rows from pre-training for 4 categories" in report.summary()
    classifier = model.head.class_embed
    pretrained_weight, pretrained_bias = weights["detection_heads.class_embed.weight"], weights["detection_heads.class_embed.bias"]
    for row, source in ((1, 1), (2, 6), (3, 4), (5, 3), (6, 10)):  # row 6: no-object, pre-training's last row
        assert torch.equal(classifier.weight[row], pretrained_weight[source])
        assert torch.equal(classifier.bias[row], pretrained_bias[source])
    for row in (0, 4):  # circle and pentagon keep their fresh initialisation
        assert torch.equal(classifier.weight[row], fresh.weight[row])
        assert torch.equal(classifier.bias[row], fresh.bias[row])


def test_pretraining_classifier_of_another_label_space_is_not_copied(config, training, pretraining_checkpoint, tmp_path):
    directory, _ = pretraining_checkpoint
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    fresh = build_model(config, training, with_text=True).head.class_embed
    # Three classes named, but the checkpoint's classifier has ten: the file is not this classifier's. Then
    # ten classes, none of them a detection category: the two label spaces share nothing, no-object included.
    for vocab in (["square", "triangle", "star"], [f"thing {i}" for i in range(10)]):
        (tmp_path / "objects_vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        model = build_model(config, training, with_text=True)
        report = load_task_weights(model, tmp_path)
        assert report.rows_from_pretraining == []
        assert torch.equal(model.head.class_embed.weight, fresh.weight)
        assert torch.equal(model.head.class_embed.bias, fresh.bias)


def test_pretraining_checkpoint_loads_the_word_embeddings(config, training, pretraining_checkpoint):
    directory, weights = pretraining_checkpoint
    model = build_model(config, training, with_text=True)
    report = load_task_weights(model, directory)  # tied to the heads, which the detection model drops
    assert "vlp.text_embeddings.word_embeddings.weight" in report.loaded
    assert torch.equal(model.vlp.text_embeddings.word_embeddings.weight, weights["text_embeddings.word_embeddings.weight"])


def test_anchor_queries_start_the_pretrained_box_mlp_at_the_anchors(config, training, pretraining_checkpoint, tmp_path):
    directory, weights = pretraining_checkpoint
    model = build_model(config.replace(anchor_queries=True), training, with_text=True)
    report = load_task_weights(model, directory)
    # pre-training had free query embeddings: the anchors are new, the embeddings unused, and the box MLP
    # loads but its last layer restarts at zero, since it now predicts offsets from the anchors
    assert "vlp.query_anchors.anchors.weight" in report.new and "vlp.query_embed.weight" in report.unused
    layers = model.head.bbox_embed.layers
    assert torch.equal(layers[0].weight, weights["detection_heads.bbox_embed.layers.0.weight"])
    assert not layers[-1].weight.any() and not layers[-1].bias.any()
    assert weights["detection_heads.bbox_embed.layers.2.weight"].any()
    # from a checkpoint that had anchors, the box MLP loads whole
    torch.manual_seed(3)
    anchored = E2EVLP(config.replace(anchor_queries=True, num_classes=10, num_attributes=5))
    anchored.detection_heads.bbox_embed.layers[-1].weight.data.normal_()
    save_model(anchored, str(tmp_path / "model.safetensors"))
    model = build_model(config.replace(anchor_queries=True), training, with_text=True)
    load_task_weights(model, tmp_path)
    assert torch.equal(model.head.bbox_embed.layers[-1].weight, anchored.detection_heads.bbox_embed.layers[-1].weight)
    assert torch.equal(model.vlp.query_anchors.anchors.weight, anchored.query_anchors.anchors.weight)
