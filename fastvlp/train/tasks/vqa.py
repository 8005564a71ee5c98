"""VQA: an answer classifier on [CLS] of the (image, question) encoding, trained with binary cross-entropy
against VQA's soft scores over the most frequent training answers, scored with the official accuracy."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.data.datasets.vqa import NUM_ANSWERS, VqaDataset, build_answer_vocabulary, soft_scores
from fastvlp.data.readers.vqa import read_vqa
from fastvlp.data.transforms import eval_transform
from fastvlp.eval.result_files import vqa_results
from fastvlp.eval.vqa_accuracy import normalize_vqa_answer, vqa_accuracy_score
from fastvlp.models.task_heads import VqaHead
from fastvlp.models.task_losses import vqa_soft_bce
from fastvlp.train.tasks.base import EvaluationResult, Task, TrainingData, readable_samples
from fastvlp.train.tasks.batch import TaskBatch, TaskOutput, images_and_mask
from fastvlp.train.tasks.model import TaskModel
from fastvlp.train.tasks.text_batch import encode_texts


class VqaModel(TaskModel):
    """``task_state["answers"]``: the answer vocabulary, in the classifier's order."""

    task_name = "vqa"

    def __init__(self, config, task_state) -> None:
        super().__init__(config, task_state)
        answers = self.task_state.get("answers")
        if not answers:
            raise ValueError("task_state: expected a non-empty 'answers' list")
        self.head = VqaHead(config.d_model, len(answers))
        prior = self.task_state.get("answer_prior")
        if prior is not None:
            self.head.init_bias_from_prior(prior)

    def answer_logits(self, images, pixel_mask, input_ids, text_attention_mask) -> torch.Tensor:
        encoded = self.vlp.encode(images, pixel_mask, input_ids, text_attention_mask)
        return self.head(encoded.cls_hidden)

    def forward(self, batch: TaskBatch) -> TaskOutput:
        self.clear_attention_paths()
        logits = self.answer_logits(batch["images"], batch["pixel_mask"], batch["input_ids"], batch["text_attention_mask"])
        loss = vqa_soft_bce(logits, batch["targets"])
        return TaskOutput(loss, {"loss_vqa": loss}, logits)


def _records(data_dir: Path, split: str):
    return read_vqa(Path(data_dir) / "vqa", Path(data_dir) / "coco", split)


def answer_type_key(answer_type: str) -> str:
    """A VQA answer type as a metric-name suffix: 'yes/no' -> 'yes_no'."""
    return "".join(c if c.isalnum() else "_" for c in answer_type.strip().lower())


def typed_annotations(records) -> List[Dict[str, Any]]:
    """VqaRecords as the annotation records `vqa_accuracy_score` reads, with their answer types."""
    return [{"question_id": r.question_id, "answers": list(r.answers), "answer_type": r.answer_type} for r in records]


def vqa_baselines(train_records: Sequence, eval_records: Sequence) -> Dict[str, float]:
    """The trivial baselines' VQA accuracy on ``eval_records``: the most frequent training answer for every
    question, and the most frequent training answer of each question's ``question_type``; a tie goes to the
    alphabetically first answer. Where the
    records carry an ``answer_type``, each baseline is also given per answer type, under its key plus
    ``_`` plus :func:`answer_type_key` (``question_type_prior_yes_no``, ...)."""
    overall = Counter(normalize_vqa_answer(r.multiple_choice_answer) for r in train_records if r.multiple_choice_answer)
    by_type: Dict[str, Counter] = {}
    for r in train_records:
        if r.multiple_choice_answer:
            by_type.setdefault(r.question_type or "", Counter())[normalize_vqa_answer(r.multiple_choice_answer)] += 1
    if not overall:
        raise ValueError("train_records: expected at least one record with a multiple_choice_answer")
    top = min(overall.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def type_answer(record) -> str:
        counts = by_type.get(record.question_type or "")
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else top

    annotations = typed_annotations(eval_records)
    result: Dict[str, float] = {}
    for name, answer in (("most_frequent_answer", lambda r: top), ("question_type_prior", type_answer)):
        score = vqa_accuracy_score({r.question_id: answer(r) for r in eval_records}, annotations)
        result[name] = float(score["accuracy"])
        for answer_type, value in score.get("per_answer_type", {}).items():
            result[f"{name}_{answer_type_key(answer_type)}"] = float(value)
    return result


def answer_prior(records: Sequence, answers: Sequence[str]) -> List[float]:
    """Each answer's mean soft score over ``records``: the constant prediction that minimises the soft-score
    BCE, used to initialise the answer head's bias."""
    index = {answer: i for i, answer in enumerate(answers)}
    total = torch.zeros(len(answers), dtype=torch.float64)
    for record in records:
        total += soft_scores(record.answers, index, normalize_vqa_answer).double()
    return (total / max(len(records), 1)).tolist()


def _num_answers(options: Dict[str, Any]) -> int:
    # Only a missing (or None) value takes the default: 0 is an error, not a request for the default.
    value = options.get("num_answers")
    if value is None:
        return NUM_ANSWERS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_answers: expected a positive int, got {value!r}")
    return value


class VqaTask(Task):
    name = "vqa"
    loss_keys = ("loss", "loss_vqa")
    model_class = VqaModel
    eval_split = "val"
    default_max_steps = 3000
    # The paper's 1e-4 as it is, even where pre-training ran faster (tiny's 5e-4): fine-tuned for 300 steps
    # from a 200-step tiny pre-training on 512 synthetic images, VQA scored 0.358 at 1e-4 against 0.352 at
    # the scaled 5e-4 (on one thread: 0.368 and 0.356 with seeds 0 and 1, 0.358 at 5e-5, 0.347 at 5e-4).
    scale_paper_lr = False

    def validate_options(self, options: Dict[str, Any]) -> None:
        """``num_answers`` (default 3129, VQA's usual answer vocabulary) must be a positive int."""
        _num_answers(options)

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        num_answers = _num_answers(options)
        result = _records(data_dir, "train")
        records = [r for r in result.records if r.answers]
        answers = build_answer_vocabulary(records, num_answers, normalise=normalize_vqa_answer)
        return TrainingData(records, result.skips, {"answers": answers, "answer_prior": answer_prior(records, answers)})

    def tokenizer_texts(self, records):
        return (r.question for r in records)

    def training_dataset(self, records, transform, task_state):
        return VqaDataset(records, transform, task_state["answers"], normalise=normalize_vqa_answer)

    def build_batch(self, collated, tokenizer, generator) -> TaskBatch:
        images, pixel_mask = images_and_mask(collated)
        input_ids, attention = encode_texts(tokenizer, collated["question"])
        return TaskBatch(images=images, pixel_mask=pixel_mask, input_ids=input_ids, text_attention_mask=attention,
                         targets=collated["target"])

    @torch.inference_mode()
    def evaluate(self, model, tokenizer, data_dir, split, device, batch_size, scale) -> EvaluationResult:
        result = _records(data_dir, split)
        dataset = VqaDataset(result.records, eval_transform(scale))
        answers: List[str] = model.task_state["answers"]
        predictions: Dict[int, str] = {}
        skipped = dict(result.skips.counts)
        model.eval()
        for collated in readable_samples(dataset, batch_size, skipped):
            batch = self.build_batch({**collated, "target": None}, tokenizer, None).to(device)
            logits = model.answer_logits(batch["images"], batch["pixel_mask"], batch["input_ids"], batch["text_attention_mask"])
            for question_id, index in zip(collated["question_id"], logits.argmax(dim=-1).tolist()):
                predictions[question_id] = answers[index]
        annotated = typed_annotations(r for r in result.records if r.answers and r.question_id in predictions)
        answered = {a["question_id"] for a in annotated}
        score = vqa_accuracy_score({q: a for q, a in predictions.items() if q in answered}, annotated) if annotated else None
        metrics = {"accuracy": float(score["accuracy"])} if score else {}
        # As the official evaluation does, also per answer type ('yes/no', 'number', 'other'), where the
        # annotations give one: it shows which kinds of question a model answers.
        for answer_type, value in (score or {}).get("per_answer_type", {}).items():
            metrics["accuracy_" + answer_type_key(answer_type)] = float(value)
        notes = [] if annotated else [f"split {split!r} has no answers: accuracy not computed"]
        return EvaluationResult(self.name, split, len(predictions), metrics, vqa_results(predictions), skipped, notes)

    @torch.inference_mode()
    def predict(self, model, tokenizer, images, sizes, text: Optional[str], top_k: int) -> Dict[str, Any]:
        if not text:
            raise ValueError("text: VQA needs a question")
        from fastvlp.data.collate import nested_tensor_from_images

        nested = nested_tensor_from_images(images[:1])
        input_ids, attention = encode_texts(tokenizer, [text])
        device = next(model.parameters()).device
        logits = model.answer_logits(nested.tensors.to(device), nested.mask.to(device), input_ids.to(device), attention.to(device))
        scores = torch.sigmoid(logits.float())[0]
        values, indices = scores.topk(min(top_k, scores.numel()))
        answers = model.task_state["answers"]
        return {"task": "vqa", "question": text,
                "answers": [{"answer": answers[i], "score": float(v)} for v, i in zip(values.tolist(), indices.tolist())]}
