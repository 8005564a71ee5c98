"""VQA fine-tuning: the answer vocabulary and soft-score targets, the model's loss against a float64
reference, evaluation with the official accuracy, the trivial baselines and predict (a very small model
on a small synthetic VQA set, CPU)."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.data.readers.vqa import read_vqa
from fastvlp.data.records import VqaRecord
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.eval.vqa_accuracy import normalize_vqa_answer, vqa_accuracy
from fastvlp.models.presets import get_preset
from fastvlp.train.tasks import get_task
from fastvlp.train.tasks.base import SeededSamples, collate_task_samples
from fastvlp.train.tasks.vqa import VqaModel, VqaTask, answer_prior, vqa_baselines

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SOFT = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}  # 4 or more annotators: 1.0

# Training answers rewritten into forms that only the official normalisation maps back:
# (multiple-choice answer, annotator answer) -> the raw text written instead.
RAW_FORMS = {"yes": "Yes!", "2": "Two.", "red": "Red."}
# The synthetic annotators sometimes spell small numbers out.
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 synthetic COCO images with VQA questions; in the training annotations the first question whose
    chosen answer is ``yes``, ``2`` or ``red`` has that answer (and its annotators' matching answers)
    rewritten in a raw form (``Yes!``, ``Two.``, ``Red.``). Returns the folder and the original, already
    normalised, training annotations."""
    root = tmp_path_factory.mktemp("vqa_data")
    write_synthetic_dataset(root, 24, seed=0, datasets=("coco", "vqa"))
    path = root / "vqa" / "v2_mscoco_train_annotations.json"
    content = json.loads(path.read_text())
    original = json.loads(json.dumps(content["annotations"]))
    assert all(normalize_vqa_answer(e["multiple_choice_answer"]) == e["multiple_choice_answer"] for e in original)
    assert all(normalize_vqa_answer(a["answer"]) == NUMBER_WORDS.get(a["answer"], a["answer"])
               for e in original for a in e["answers"])
    pending = dict(RAW_FORMS)
    for entry in content["annotations"]:
        raw = pending.pop(entry["multiple_choice_answer"], None)
        if raw is None:
            continue
        for answer in entry["answers"]:
            if answer["answer"] == entry["multiple_choice_answer"]:
                answer["answer"] = raw
        entry["multiple_choice_answer"] = raw
    assert not pending, f"the synthetic set has no question answered {sorted(pending)}"
    path.write_text(json.dumps(content))
    return root, {e["question_id"]: e for e in original}


@pytest.fixture(scope="module")
def task():
    return get_task("vqa")


@pytest.fixture(scope="module")
def training(task, data):
    return task.read_training_data(data[0], {})


@pytest.fixture(scope="module")
def tokenizer(task, training):
    return WordPieceTokenizer.train_on_texts(task.tokenizer_texts(training.records))


@pytest.fixture(scope="module")
def config(tokenizer):
    return get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                      max_text_len=tokenizer.max_length, **SMALL_MODEL)


@pytest.fixture(scope="module")
def model(config, training):
    torch.manual_seed(0)
    model = VqaModel(config, training.task_state)
    with torch.no_grad():  # wider logits than a fresh head's, so that questions get different answers
        model.head.classifier.output.weight.mul_(30.0)
    return model.eval()


def expected_target(entry, answers):
    """The soft scores of an original annotation over the vocabulary ``answers``, counted by hand."""
    counts = Counter(NUMBER_WORDS.get(a["answer"], a["answer"]) for a in entry["answers"])
    return torch.tensor([SOFT.get(counts[a], 1.0) for a in answers], dtype=torch.float64)


def test_vocabulary_is_the_normalised_answers_most_frequent_first(task, training, data):
    _, original = data
    assert isinstance(task, VqaTask)
    questions = json.loads((data[0] / "vqa" / "v2_OpenEnded_mscoco_train_questions.json").read_text())["questions"]
    assert [r.question_id for r in training.records] == [q["question_id"] for q in questions]
    counts = Counter(e["multiple_choice_answer"] for e in original.values())
    answers = training.task_state["answers"]
    assert set(answers) == set(counts) and len(answers) == len(counts)
    assert not set(RAW_FORMS.values()) & set(answers)  # the raw forms were normalised into the others
    frequencies = [counts[a] for a in answers]
    assert frequencies == sorted(frequencies, reverse=True) and frequencies[0] > frequencies[-1]
    for first, second in zip(answers, answers[1:]):  # ties in alphabetical order
        assert counts[first] > counts[second] or first < second
    # num_answers keeps the most frequent ones
    assert task.read_training_data(data[0], {"num_answers": 3}).task_state["answers"] == answers[:3]


def test_soft_scores_reach_the_batch(task, training, tokenizer, data):
    _, original = data
    answers = training.task_state["answers"]
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), training.task_state), seed=1)
    targets = {r.question_id: expected_target(original[r.question_id], answers) for r in training.records}
    levels = {round(float(v), 6) for t in targets.values() for v in t}
    assert levels == {0.0, 0.3, 0.6, 0.9, 1.0}
    # a batch holding every level, and the questions whose answers were rewritten
    chosen, seen = [], set()
    for index, record in enumerate(training.records):
        raw = record.multiple_choice_answer in RAW_FORMS.values()
        new = {round(float(v), 6) for v in targets[record.question_id]} - seen
        if raw or new:
            chosen.append(index)
            seen |= new
    assert len(chosen) >= 4
    batch = task.build_batch(collate_task_samples([dataset[(0, i)] for i in chosen]), tokenizer, None)
    expected = torch.stack([targets[training.records[i].question_id] for i in chosen])
    assert batch["targets"].dtype == torch.float32
    torch.testing.assert_close(batch["targets"].double(), expected, atol=1e-7, rtol=0)
    assert batch["images"].shape[0] == batch["input_ids"].shape[0] == len(chosen)
    assert batch["pixel_mask"].dtype == torch.bool and batch["text_attention_mask"].dtype == torch.bool
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_id


def test_model_keeps_the_encoder_only(config, training):
    model = VqaModel(config, training.task_state)
    assert model.head.num_answers == len(training.task_state["answers"])
    for part in ("decoder", "query_embed", "mlm_head", "itm_head", "detection_heads", "caption_head"):
        assert getattr(model.vlp, part) is None
    with pytest.raises(ValueError, match="answers"):
        VqaModel(config, {"answers": []})
    with pytest.raises(ValueError, match="answers"):
        VqaModel(config, {})


def test_forward_loss_is_the_soft_bce_and_gradients_flow(config, training, task, tokenizer):
    torch.manual_seed(1)
    model = VqaModel(config, training.task_state).train()
    dataset = SeededSamples(task.training_dataset(training.records, train_transform(SMALL_SCALE), training.task_state), seed=2)
    batch = task.build_batch(collate_task_samples([dataset[(0, i)] for i in range(5)]), tokenizer, None)
    output = model(batch)
    assert output.logits.shape == (5, len(training.task_state["answers"]))
    assert set(output.losses) == {"loss_vqa"} and output.losses["loss_vqa"] is output.loss
    x, t = output.logits.detach().double(), batch["targets"].double()
    reference = -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x))).sum() / x.shape[0]
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    output.loss.backward()
    for parameter in (model.head.classifier.output.weight, model.head.classifier.dense.weight,
                      model.vlp.encoder.layers[0].linear1.weight, model.vlp.text_embeddings.word_embeddings.weight,
                      next(model.vlp.backbone.body.parameters())):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


def test_evaluate_is_the_official_accuracy_of_its_predictions(task, model, tokenizer, data):
    root, _ = data
    result = task.evaluate(model, tokenizer, root, "val", CPU, 8, SMALL_SCALE)
    records = {r.question_id: r for r in read_vqa(root / "vqa", root / "coco", "val").records}
    # 9 validation images: five questions each, and the yes/no deck's 3 spare cards as sixth questions.
    assert result.task == "vqa" and result.split == "val" and result.num_examples == len(records) == 5 * 9 + 3
    assert [p["question_id"] for p in result.predictions] == list(records)
    assert set(p["answer"] for p in result.predictions) <= set(model.task_state["answers"])
    assert len(set(p["answer"] for p in result.predictions)) > 1
    scores = [vqa_accuracy(p["answer"], list(records[p["question_id"]].answers)) for p in result.predictions]
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.metrics["accuracy"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    by_type = {}
    for p, score in zip(result.predictions, scores):
        by_type.setdefault(records[p["question_id"]].answer_type.replace("/", "_"), []).append(score)
    assert len(by_type) > 1
    assert set(result.metrics) == {"accuracy"} | {f"accuracy_{t}" for t in by_type}
    for answer_type, values in by_type.items():
        assert result.metrics[f"accuracy_{answer_type}"] == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert result.skipped == {} and result.notes == []


def test_evaluate_a_split_without_answers(task, model, tokenizer, data, tmp_path):
    root, _ = data
    questions = json.loads((root / "vqa" / "v2_OpenEnded_mscoco_val_questions.json").read_text())
    questions["questions"] = questions["questions"][:5]
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "v2_OpenEnded_mscoco_val_questions.json").write_text(json.dumps(questions))
    (tmp_path / "coco").symlink_to(root / "coco")
    result = task.evaluate(model, tokenizer, tmp_path, "val", CPU, 4, SMALL_SCALE)
    assert result.metrics == {} and result.num_examples == 5 and "no answers" in result.notes[0]
    assert [p["question_id"] for p in result.predictions] == [q["question_id"] for q in questions["questions"]]


def _record(question_id, question_type, answer=None, answers=()):
    return VqaRecord(question_id, question_id, Path("unused.jpg"), "?", tuple(answers), answer, question_type)


def test_baselines_against_a_hand_computation():
    train = [
        _record(1, "what color is the", "red"), _record(2, "what color is the", "Red"),
        _record(3, "what color is the", "blue"), _record(4, "how many", "2"), _record(5, "how many", "two"),
        _record(6, "is there a", "yes"), _record(7, "is there a", "yes"), _record(8, "is there a", "yes"),
        _record(9, "is there a", None),  # no answer: not counted
    ]
    evaluation = [
        _record(11, "what color is the", answers=["red"] * 3 + ["blue"] * 7),
        _record(12, "how many", answers=["2"] * 10),
        _record(13, "is there a", answers=["yes"] + ["no"] * 9),
        _record(14, "what sport is", answers=["yes"] * 4 + ["tennis"] * 6),  # type unseen: the overall answer
    ]
    # Leave-one-out accuracy: 3 of 10 annotators -> (3 * 2/3 + 7 * 1) / 10 = 0.9; 1 of 10 -> 9 * (1/3) / 10.
    # Overall top answer "yes" (3); per type: red, 2, yes.
    result = vqa_baselines(train, evaluation)
    assert result["most_frequent_answer"] == pytest.approx((0 + 0 + 0.3 + 1.0) / 4, abs=1e-12)
    assert result["question_type_prior"] == pytest.approx((0.9 + 1.0 + 0.3 + 1.0) / 4, abs=1e-12)
    # ties go to the alphabetically first answer
    tied = vqa_baselines([_record(1, "a", "yes"), _record(2, "a", "no")], [_record(3, "a", answers=["no"] * 10)])
    assert tied == {"most_frequent_answer": 1.0, "question_type_prior": 1.0}


def test_baselines_per_answer_type():
    def typed(question_id, question_type, answer_type, answer=None, answers=()):
        return VqaRecord(question_id, question_id, Path("unused.jpg"), "?", tuple(answers), answer, question_type,
                         answer_type)

    train = [typed(1, "what color is the", "other", "red"), typed(2, "is there a", "yes/no", "no"),
             typed(3, "is there a", "yes/no", "no"), typed(4, "how many", "number", "2")]
    evaluation = [typed(11, "what color is the", "other", answers=["red"] * 10),
                  typed(12, "what color is the", "other", answers=["blue"] * 10),
                  typed(13, "is there a", "yes/no", answers=["yes"] * 10),
                  typed(14, "how many", "number", answers=["2"] * 10)]
    # Overall top answer "no"; per question type: red, no, 2.
    result = vqa_baselines(train, evaluation)
    assert result == pytest.approx({
        "most_frequent_answer": 0.0, "question_type_prior": 2 / 4,
        "most_frequent_answer_other": 0.0, "most_frequent_answer_yes_no": 0.0, "most_frequent_answer_number": 0.0,
        "question_type_prior_other": 1 / 2, "question_type_prior_yes_no": 0.0, "question_type_prior_number": 1.0,
    }, abs=1e-12)


def test_answer_prior_is_the_mean_soft_score():
    records = [_record(1, "t", "red", ["red"] * 10), _record(2, "t", "Red", ["red"] * 2 + ["blue"] * 8),
               _record(3, "t", "two", ["2"] * 3 + ["7"] * 7)]
    # Soft scores by annotator count: 10 -> 1.0, 2 -> 0.6, 8 -> 1.0, 3 -> 0.9; "7" is outside the vocabulary.
    prior = answer_prior(records, ["red", "blue", "2"])
    assert prior == pytest.approx([(1.0 + 0.6) / 3, 1.0 / 3, 0.9 / 3], abs=1e-6)  # float32 soft scores


def test_model_starts_from_the_answer_prior(config, training):
    prior = training.task_state["answer_prior"]
    assert len(prior) == len(training.task_state["answers"]) and all(0 < p <= 1 for p in prior)
    model = VqaModel(config, training.task_state)
    bias = model.head.classifier.output.bias.detach().double()
    assert torch.sigmoid(bias) == pytest.approx(prior, abs=1e-6)
    with pytest.raises(ValueError, match="prior"):
        VqaModel(config, {**training.task_state, "answer_prior": prior[:-1]})
    with pytest.raises(ValueError, match="prior"):
        VqaModel(config, {**training.task_state, "answer_prior": [1.5] * len(prior)})


def test_predict_top_k(task, config, tokenizer, training):
    torch.manual_seed(2)
    model = VqaModel(config, training.task_state).eval()  # a fresh head: probabilities well inside (0, 1)
    record = training.records[0]
    sample = task.training_dataset([record], eval_transform(SMALL_SCALE), training.task_state)[0]
    answer = task.predict(model, tokenizer, [sample["image"]], [sample["size"]], record.question, top_k=4)
    assert answer["task"] == "vqa" and answer["question"] == record.question and len(answer["answers"]) == 4
    scores = [a["score"] for a in answer["answers"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    with torch.no_grad():
        encoded = tokenizer.encode_batch([record.question])
        input_ids, attention = encoded.input_ids, encoded.attention_mask
        mask = torch.zeros(1, *sample["image"].shape[1:], dtype=torch.bool)
        probabilities = torch.sigmoid(model.answer_logits(sample["image"][None], mask, input_ids, attention)[0].double())
    best = probabilities.argsort(descending=True)[:4].tolist()
    assert [a["answer"] for a in answer["answers"]] == [model.task_state["answers"][i] for i in best]
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), probabilities[best], atol=1e-6, rtol=0)
    everything = task.predict(model, tokenizer, [sample["image"]], [sample["size"]], record.question, top_k=1000)
    assert len(everything["answers"]) == len(model.task_state["answers"])
    for missing in (None, ""):
        with pytest.raises(ValueError, match="question"):
            task.predict(model, tokenizer, [sample["image"]], [sample["size"]], missing, top_k=3)
