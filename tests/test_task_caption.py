"""Caption fine-tuning: the Karpathy / COCO split choice, the label-smoothed loss against a float64
reference, the image-only encoder pass, loading a pre-training checkpoint, evaluation with the COCO caption
metrics, the most-frequent-caption baseline, predict, and the decoding settings (a very small model on a
small synthetic COCO, CPU)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_model
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.data.records import ImageRecord
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.eval import caption_metrics
from fastvlp.eval.caption_metrics import caption_scores
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.generation import generate_captions
from fastvlp.models.presets import get_preset
from fastvlp.train.tasks import get_task
from fastvlp.train.tasks.base import SeededSamples, collate_task_samples
from fastvlp.train.tasks.caption import (
    CaptionModel,
    CaptionTask,
    caption_baseline,
    generation_settings,
    read_caption_records,
)
from fastvlp.train.tasks.weights import load_task_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
CORE_METRICS = {"bleu4", "rouge_l", "cider", "distinct"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_data")
    write_synthetic_dataset(root, 24, seed=1, datasets=("coco",))
    return root


@pytest.fixture(scope="module")
def coco_only(data, tmp_path_factory):
    """The same COCO without the Karpathy file: only COCO's own captions files."""
    root = tmp_path_factory.mktemp("coco_only")
    (root / "coco").mkdir()
    for name in ("images", "annotations"):
        (root / "coco" / name).symlink_to(data / "coco" / name)
    return root


@pytest.fixture(scope="module")
def karpathy_folder(data, tmp_path_factory):
    """The same COCO with the Karpathy file in coco/karpathy/, one of the published layouts."""
    root = tmp_path_factory.mktemp("karpathy_folder")
    (root / "coco" / "karpathy").mkdir(parents=True)
    for name in ("images", "annotations"):
        (root / "coco" / name).symlink_to(data / "coco" / name)
    shutil.copy(data / "coco" / "dataset_coco.json", root / "coco" / "karpathy" / "dataset_coco.json")
    return root


@pytest.fixture(scope="module")
def task():
    return get_task("caption")


@pytest.fixture(scope="module")
def training(task, data):
    return task.read_training_data(data, {})


@pytest.fixture(scope="module")
def tokenizer(task, training):
    return WordPieceTokenizer.train_on_texts(task.tokenizer_texts(training.records))


@pytest.fixture(scope="module")
def config(tokenizer):
    return get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                      max_text_len=tokenizer.max_length, **SMALL_MODEL)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return CaptionModel(config, {}).eval()


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    """The Java-free metric path everywhere: with Java, each scoring starts the PTB tokenizer twice and
    METEOR's jar, tens of seconds on a small machine (and a CI machine may have no Java)."""
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)


def training_batch(task, training, tokenizer, size=4, seed=3):
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), {}), seed=seed)
    return task.build_batch(collate_task_samples([dataset[(0, i)] for i in range(size)]), tokenizer, None)


def _karpathy(data):
    return json.loads((data / "coco" / "dataset_coco.json").read_text())["images"]


def _coco_captions(data, split):
    content = json.loads((data / "coco" / "annotations" / f"captions_{split}.json").read_text())
    captions = {}
    for entry in content["annotations"]:
        captions.setdefault(entry["image_id"], []).append(entry["caption"])
    return captions


def test_records_from_karpathy_when_present(task, data, training):
    assert isinstance(task, CaptionTask)
    entries = _karpathy(data)
    for split, names in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",))):
        records = read_caption_records(data, split).records
        expected = {e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries if e["split"] in names}
        assert {r.image_id: list(r.captions) for r in records} == expected and expected
    assert {r.image_id for r in training.records} == {e["cocoid"] for e in entries if e["split"] in ("train", "restval")}
    assert training.task_state == {}


def test_records_from_coco_captions_without_karpathy(task, data, coco_only):
    for split in ("train", "val"):
        records = read_caption_records(coco_only, split).records
        assert {r.image_id: list(r.captions) for r in records} == _coco_captions(data, split)
    # COCO's train split is not Karpathy's train + restval
    karpathy_train = {r.image_id for r in read_caption_records(data, "train").records}
    assert {r.image_id for r in task.read_training_data(coco_only, {}).records} != karpathy_train


def test_records_from_karpathy_in_coco_karpathy(task, data, karpathy_folder, tokenizer, model):
    entries = _karpathy(data)
    for split, names in (("train", ("train", "restval")), ("test", ("test",))):
        records = read_caption_records(karpathy_folder, split).records
        expected = {e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries if e["split"] in names}
        assert {r.image_id: list(r.captions) for r in records} == expected and expected
    train_ids = {r.image_id for r in task.read_training_data(karpathy_folder, {}).records}
    assert train_ids == {e["cocoid"] for e in entries if e["split"] in ("train", "restval")}
    assert train_ids != set(_coco_captions(data, "train"))  # not COCO's captions files, which are also there
    # evaluation takes Karpathy's test split, with no note of a missing Karpathy file
    result = task.evaluate(model, tokenizer, karpathy_folder, "test", CPU, 4, SMALL_SCALE)
    assert result.split == "test" and not any("Karpathy" in note for note in result.notes)
    assert [p["image_id"] for p in result.predictions] == [e["cocoid"] for e in entries if e["split"] == "test"]


def test_model_keeps_its_decoder_and_caption_head(config):
    model = CaptionModel(config, {})
    assert model.vlp.decoder is not None and model.vlp.caption_head is not None
    for part in ("query_embed", "mlm_head", "itm_head", "detection_heads"):
        assert getattr(model.vlp, part) is None


def test_loss_is_label_smoothed_cross_entropy(config, task, training, tokenizer):
    torch.manual_seed(1)
    model = CaptionModel(config, {}).train()
    batch = training_batch(task, training, tokenizer)
    output = model(batch)
    ids, mask = batch["caption_ids"], batch["caption_attention_mask"]
    assert ids[:, 0].eq(tokenizer.cls_id).all() and not mask.all()  # [CLS] starts each caption; some padding
    assert output.logits.shape == (4, ids.shape[1] - 1, config.vocab_size)
    assert set(output.losses) == {"loss_cap"} and output.losses["loss_cap"] is output.loss
    log_p = torch.log_softmax(output.logits.detach().double(), dim=-1)
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for position in range(ids.shape[1] - 1):
            if mask[row, position + 1]:  # the next token is real: it is a label
                target = ids[row, position + 1]
                total += 0.9 * -log_p[row, position, target] + 0.1 * -log_p[row, position].mean()
                count += 1
    assert output.loss.item() == pytest.approx((total / count).item(), rel=1e-5)
    output.loss.backward()
    for parameter in (next(model.vlp.caption_head.parameters()), model.vlp.decoder.layers[0].linear1.weight,
                      model.vlp.encoder.layers[0].linear1.weight, next(model.vlp.backbone.body.parameters())):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_the_encoder_never_sees_the_caption(config, task, training, tokenizer, model):
    batch = training_batch(task, training, tokenizer)
    other = dict(batch)
    generator = torch.Generator().manual_seed(4)
    replaced = torch.randint(tokenizer.sep_id + 1, config.vocab_size, batch["caption_ids"].shape, generator=generator)
    other["caption_ids"] = torch.where(batch["caption_attention_mask"], replaced, batch["caption_ids"])
    other["caption_ids"][:, 0] = tokenizer.cls_id
    memories = []
    handle = model.vlp.encoder.register_forward_hook(lambda module, args, out: memories.append(out.detach().clone()))
    try:
        with torch.no_grad():
            loss_a = model(type(batch)(batch)).loss
            loss_b = model(type(batch)(other)).loss
            alone = model.vlp.encode_image_only(batch["images"], batch["pixel_mask"])
    finally:
        handle.remove()
    assert len(memories) == 3
    assert torch.equal(memories[0], memories[1])  # other caption tokens, the same encoder output
    assert torch.equal(memories[0], memories[2])  # ... which is the image-only pass
    assert alone.text_length == 0 and alone.memory.shape[1] == memories[0].shape[0]
    assert abs(loss_a.item() - loss_b.item()) > 1e-4  # the caption does reach the loss


def test_evaluate_scores_the_generated_captions(task, model, tokenizer, data):
    result = task.evaluate(model, tokenizer, data, "test", CPU, 3, SMALL_SCALE)  # batches of 3 and 1
    test_ids = [e["cocoid"] for e in _karpathy(data) if e["split"] == "test"]
    assert result.task == "caption" and result.split == "test" and result.num_examples == len(test_ids)
    assert [p["image_id"] for p in result.predictions] == test_ids
    assert all(set(p) == {"image_id", "caption"} and isinstance(p["caption"], str) for p in result.predictions)
    assert set(result.metrics) == CORE_METRICS  # no METEOR without Java
    assert any("simple" in note for note in result.notes)
    assert 0 <= result.metrics["bleu4"] <= 1 and 0 <= result.metrics["rouge_l"] <= 1 and result.metrics["cider"] >= 0
    # the scores are those of the returned captions against the split's references
    references = {r.image_id: list(r.captions) for r in read_caption_records(data, "test").records}
    expected = caption_scores({p["image_id"]: p["caption"] for p in result.predictions}, references)
    assert {k: result.metrics[k] for k in CORE_METRICS} == pytest.approx({k: expected[k] for k in CORE_METRICS}, abs=1e-12)
    # one image a batch (no padding): each caption is what generate gives for that image alone
    single = task.evaluate(model, tokenizer, data, "test", CPU, 1, SMALL_SCALE)
    records = read_caption_records(data, "test").records
    dataset = task.training_dataset(records, eval_transform(SMALL_SCALE), {})
    for index, prediction in enumerate(single.predictions):
        sample = dataset[index]
        mask = torch.zeros(1, *sample["image"].shape[1:], dtype=torch.bool)
        with torch.no_grad():
            assert prediction["caption"] == model.generate(sample["image"][None], mask, tokenizer)[0]


def test_evaluate_reports_meteor_when_the_scorer_gives_it(task, model, tokenizer, data, monkeypatch):
    """With Java, caption_scores adds METEOR, and evaluate passes it on (the scorer stubbed to add one,
    since running Java is slow)."""
    import fastvlp.train.tasks.caption as caption_module

    def with_meteor(predictions, references):
        return {**caption_scores(predictions, references), "meteor": 0.25}

    monkeypatch.setattr(caption_module, "caption_scores", with_meteor)
    result = task.evaluate(model, tokenizer, data, "val", CPU, 4, SMALL_SCALE)
    assert set(result.metrics) == CORE_METRICS | {"meteor"} and result.metrics["meteor"] == 0.25


def test_evaluate_without_karpathy_uses_coco_val(task, model, tokenizer, coco_only):
    result = task.evaluate(model, tokenizer, coco_only, "test", CPU, 4, SMALL_SCALE)
    assert result.split == "val"
    # the note names each place the reader looked for the Karpathy file
    note = next(note for note in result.notes if "COCO's val captions" in note)
    for folder in ("", "karpathy", "annotations"):
        assert str(coco_only / "coco" / folder / "dataset_coco.json") in note
    assert {p["image_id"] for p in result.predictions} == set(_coco_captions(coco_only, "val"))
    assert set(result.metrics) == CORE_METRICS and any("simple" in note for note in result.notes)


def test_evaluate_without_captions_says_so(task, model, tokenizer, data, tmp_path):
    """Every test image unreadable, and a split without images: no captions, no metrics, and a note."""
    coco = tmp_path / "unreadable" / "coco"
    shutil.copytree(data / "coco", coco)
    test_ids = [e["cocoid"] for e in _karpathy(data) if e["split"] == "test"]
    for image_id in test_ids:
        for path in coco.rglob(f"*{image_id:012d}.jpg"):
            path.write_bytes(b"not a JPEG")
    result = task.evaluate(model, tokenizer, coco.parent, "test", CPU, 4, SMALL_SCALE)
    assert result.num_examples == 0 and result.metrics == {} and result.predictions == []
    assert result.skipped == {"unreadable_image": len(test_ids)}
    assert result.notes == ["split 'test' has no readable images: no captions generated, metrics not computed"]

    content = json.loads((data / "coco" / "dataset_coco.json").read_text())
    content["images"] = [e for e in content["images"] if e["split"] != "test"]
    (coco / "dataset_coco.json").write_text(json.dumps(content))
    empty = task.evaluate(model, tokenizer, coco.parent, "test", CPU, 4, SMALL_SCALE)
    assert empty.num_examples == 0 and empty.metrics == {} and empty.skipped == {}
    assert empty.notes == result.notes


def test_pretraining_weights_load_without_new_parts(model, tokenizer, tmp_path):
    torch.manual_seed(5)
    pretrained = E2EVLP(model.config)
    save_model(pretrained, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(model.config.to_json())
    tokenizer.save(tmp_path / "tokenizer.json")
    task_model = CaptionTask().build_model(model.config, {})
    report = load_task_weights(task_model, tmp_path)
    assert report.new == [] and not report.mismatched
    # unused: only what captioning does not run
    assert {k.split(".")[1] for k in report.unused} == {"query_embed", "mlm_head", "itm_head", "detection_heads"}
    reference = pretrained.state_dict()
    state = task_model.state_dict()
    assert set(state) == {"vlp." + key for key in reference} - set(report.unused)
    for key, value in state.items():
        assert torch.equal(value, reference[key[len("vlp."):]]), key
    for part in ("decoder.", "caption_head."):
        assert sum(key.startswith("vlp." + part) for key in state) > 3


def _image(task, data):
    record = read_caption_records(data, "val").records[0]
    image = task.training_dataset([record], eval_transform(SMALL_SCALE), {})[0]["image"]
    return image, torch.zeros(1, *image.shape[1:], dtype=torch.bool)


def _generated(model, tokenizer, image, mask, **settings):
    ids = generate_captions(model.vlp, image[None], mask, bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id,
                            pad_id=tokenizer.pad_id, length_penalty=0.9, **settings)[0]
    return ids, tokenizer.decode(ids)


def test_generation_is_bounded_by_a_short_max_text_len(task, config, tokenizer, data):
    """A model whose max_text_len is below the default 20 tokens generates up to max_text_len."""
    assert config.max_text_len >= 20 and generation_settings(config) == (4, 20)
    short = config.replace(max_text_len=8)
    assert generation_settings(short) == (4, 8)
    torch.manual_seed(0)
    model = CaptionModel(short, {}).eval()
    image, mask = _image(task, data)
    sizes = [tuple(image.shape[1:])]
    _, expected = _generated(model, tokenizer, image, mask, max_length=8, num_beams=4)
    assert task.predict(model, tokenizer, [image], sizes, None, top_k=5)["caption"] == expected
    ids, greedy = _generated(model, tokenizer, image, mask, max_length=8, num_beams=1)
    assert len(ids) == 8  # this model's greedy caption reaches the bound
    assert task.predict(model, tokenizer, [image], sizes, None, 5, num_beams=1)["caption"] == greedy
    result = task.evaluate(model, tokenizer, data, "val", CPU, 4, SMALL_SCALE)
    assert result.num_examples == len(read_caption_records(data, "val").records) and set(result.metrics) == CORE_METRICS


def test_decoding_settings(task, model, tokenizer, data):
    image, mask = _image(task, data)
    sizes = [tuple(image.shape[1:])]
    for num_beams, max_length in ((1, None), (1, 6), (2, 6)):
        _, expected = _generated(model, tokenizer, image, mask, num_beams=num_beams, max_length=max_length or 20)
        answer = task.predict(model, tokenizer, [image], sizes, None, 5, num_beams=num_beams, max_length=max_length)
        assert answer["caption"] == expected
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_beams: expected a positive int"):
            task.predict(model, tokenizer, [image], sizes, None, 5, num_beams=bad)
    limit = model.config.max_text_len
    for bad in (0, limit + 1, 3.0):
        with pytest.raises(ValueError, match=rf"max_length: expected an int in \[1, {limit}\]"):
            task.predict(model, tokenizer, [image], sizes, None, 5, max_length=bad)
    # checked before the data are read
    with pytest.raises(ValueError, match="num_beams"):
        task.evaluate(model, tokenizer, data / "missing", "test", CPU, 4, SMALL_SCALE, num_beams=0)


def _images(captions_by_id):
    return [ImageRecord("coco", image_id, None, captions=tuple(captions)) for image_id, captions in captions_by_id.items()]


def test_caption_baseline_scores_the_most_frequent_caption():
    train = _images({
        1: ["A dog runs on the grass.", "a dog runs on the grass. ", "Two cats sleep."],
        2: ["A DOG RUNS ON THE GRASS.", "A red ball."],
        3: ["Two cats sleep.", "Two cats sleep"],  # "two cats sleep." twice, "two cats sleep" once
    })
    evaluation = _images({
        10: ["A dog runs on the grass.", "A dog plays in a park."],
        11: ["Two cats sleep on a sofa.", "Cats are sleeping."],
        12: ["A red ball on the floor.", "A ball."],
    })
    references = {r.image_id: list(r.captions) for r in evaluation}
    top = "a dog runs on the grass."  # three times once stripped and lower-cased
    baseline = caption_baseline(train, evaluation)
    expected = caption_scores({image_id: top for image_id in references}, references)
    assert baseline == {k: pytest.approx(expected[k], abs=1e-12) for k in CORE_METRICS}
    runner_up = caption_scores({image_id: "two cats sleep." for image_id in references}, references)
    assert baseline["bleu4"] != pytest.approx(runner_up["bleu4"], abs=1e-6)
    assert 0 < baseline["bleu4"] <= 1 and baseline["cider"] > 0


def test_predict_returns_a_caption(task, model, tokenizer, data):
    record = read_caption_records(data, "val").records[0]
    sample = task.training_dataset([record], eval_transform(SMALL_SCALE), {})[0]
    answer = task.predict(model, tokenizer, [sample["image"]], [tuple(sample["image"].shape[1:])], None, top_k=5)
    assert set(answer) == {"task", "caption"} and answer["task"] == "caption"
    assert isinstance(answer["caption"], str)
    mask = torch.zeros(1, *sample["image"].shape[1:], dtype=torch.bool)
    with torch.no_grad():
        assert answer["caption"] == model.generate(sample["image"][None], mask, tokenizer)[0]
