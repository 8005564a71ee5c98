"""NLVR2: is a statement true of a pair of images? The statement is encoded with each image (two encoder
passes), the two [CLS] vectors are concatenated into a two-way classifier, trained with cross-entropy and
scored by accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn import functional as F

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.nlvr2 import Nlvr2Dataset
from fastvlp.data.readers.nlvr2 import read_nlvr2
from fastvlp.data.transforms import eval_transform
from fastvlp.eval.classification import classification_accuracy
from fastvlp.models.task_heads import Nlvr2Head
from fastvlp.train.tasks.base import EvaluationResult, Task, TrainingData, readable_samples
from fastvlp.train.tasks.batch import TaskBatch, TaskOutput, images_and_mask
from fastvlp.train.tasks.model import TaskModel
from fastvlp.train.tasks.text_batch import encode_texts


class Nlvr2Model(TaskModel):
    """Two logits per statement (index 1 = true) from the [CLS] vectors of (left image, statement) and
    (right image, statement)."""

    task_name = "nlvr2"

    def __init__(self, config, task_state=None) -> None:
        super().__init__(config, task_state)
        self.head = Nlvr2Head(config.d_model)

    def statement_logits(self, left_images, left_mask, right_images, right_mask, input_ids, text_attention_mask) -> torch.Tensor:
        """``[B, 2]`` logits. The images are padded batches ``[B, 3, H, W]`` with pixel masks ``[B, H, W]``
        (True = padding); the left and right batches may have different sizes."""
        left = self.vlp.encode(left_images, left_mask, input_ids, text_attention_mask)
        right = self.vlp.encode(right_images, right_mask, input_ids, text_attention_mask)
        return self.head(left.cls_hidden, right.cls_hidden)

    def forward(self, batch: TaskBatch) -> TaskOutput:
        self.clear_attention_paths()
        logits = self.statement_logits(batch["left_images"], batch["left_mask"], batch["right_images"], batch["right_mask"],
                                       batch["input_ids"], batch["text_attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return TaskOutput(loss, {"loss_nlvr2": loss}, logits)


def _records(data_dir: Path, split: str):
    return read_nlvr2(Path(data_dir) / "nlvr2", split)


class Nlvr2Task(Task):
    name = "nlvr2"
    loss_keys = ("loss", "loss_nlvr2")
    model_class = Nlvr2Model
    paper_lr = 1e-4
    eval_split = "dev"
    default_max_steps = 3000

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        result = _records(data_dir, "train")
        return TrainingData([r for r in result.records if r.label is not None], result.skips, {})

    def tokenizer_texts(self, records):
        return (r.sentence for r in records)

    def training_dataset(self, records, transform, task_state):
        return Nlvr2Dataset(records, transform)

    def build_batch(self, collated, tokenizer, generator) -> TaskBatch:
        """The two image batches, the tokenised statements and, when every sample has one, the labels
        (int64, 1 = true)."""
        left_images, left_mask = images_and_mask(collated, "left_image")
        right_images, right_mask = images_and_mask(collated, "right_image")
        input_ids, attention = encode_texts(tokenizer, collated["sentence"])
        batch = TaskBatch(left_images=left_images, left_mask=left_mask, right_images=right_images, right_mask=right_mask,
                          input_ids=input_ids, text_attention_mask=attention)
        labels = collated["label"]
        if all(label is not None for label in labels):
            batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.int64)
        return batch

    @torch.inference_mode()
    def evaluate(self, model, tokenizer, data_dir, split, device, batch_size, scale) -> EvaluationResult:
        """Accuracy (a fraction) over the statements of ``split`` that have a label; every statement is
        predicted, and the predictions are ``[{"identifier", "prediction": bool}]``."""
        result = _records(data_dir, split)
        dataset = Nlvr2Dataset(result.records, eval_transform(scale))
        skipped = dict(result.skips.counts)
        predictions: List[Dict[str, Any]] = []
        predicted, labels = [], []
        model.eval()
        for collated in readable_samples(dataset, batch_size, skipped):
            batch = self.build_batch(collated, tokenizer, None).to(device)
            logits = model.statement_logits(batch["left_images"], batch["left_mask"], batch["right_images"],
                                            batch["right_mask"], batch["input_ids"], batch["text_attention_mask"])
            for identifier, label, index in zip(collated["identifier"], collated["label"], logits.argmax(dim=-1).tolist()):
                predictions.append({"identifier": identifier, "prediction": bool(index)})
                if label is not None:
                    predicted.append(index)
                    labels.append(int(label))
        metrics = {"accuracy": classification_accuracy(predicted, labels)} if labels else {}
        notes = []
        unlabelled = len(predictions) - len(labels)
        if unlabelled:
            notes.append(f"{unlabelled} of {len(predictions)} statements of split {split!r} have no label: "
                         "predicted but not scored" + ("" if labels else "; accuracy not computed"))
        return EvaluationResult(self.name, split, len(predictions), metrics, predictions, skipped, notes)

    @torch.inference_mode()
    def predict(self, model, tokenizer, images, sizes, text: Optional[str], top_k: int) -> Dict[str, Any]:
        """``images`` = [left, right]; ``probability`` is the model's probability that the statement is true."""
        if len(images) < 2:
            raise ValueError(f"images: NLVR2 needs a left and a right image (the second as image2), got {len(images)}")
        if not text:
            raise ValueError("text: NLVR2 needs a statement about the two images")
        left = nested_tensor_from_images(images[:1])
        right = nested_tensor_from_images(images[1:2])
        input_ids, attention = encode_texts(tokenizer, [text])
        device = next(model.parameters()).device
        logits = model.statement_logits(left.tensors.to(device), left.mask.to(device), right.tensors.to(device),
                                        right.mask.to(device), input_ids.to(device), attention.to(device))
        probability = float(torch.softmax(logits.float(), dim=-1)[0, 1])
        return {"task": "nlvr2", "statement": text, "label": probability > 0.5, "probability": round(probability, 6)}
