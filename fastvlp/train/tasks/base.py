"""What every fine-tuning task provides (:class:`Task`), and the pieces they share: seeded samples,
collation, the paper's step-decay schedule, and evaluation results."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch.utils.data import Dataset

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.data.skips import SkipCounter
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import ImageTransform
from fastvlp.train.seeded_samples import SeededSamples  # noqa: F401  (re-exported for the tasks)
from fastvlp.train.tasks.batch import TaskBatch
from fastvlp.train.tasks.model import TaskModel

IMAGE_KEYS = ("image", "left_image", "right_image")


@dataclass
class TrainingData:
    """A task's training records, the skips counted while reading them, and the task state derived from
    them (e.g. VQA's answer vocabulary), which ``task.json`` keeps."""

    records: List[Any]
    skips: SkipCounter
    task_state: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """``metrics`` by name; ``predictions`` in the official result-file format of the task (or None);
    ``skipped`` the records that could not be read, by reason."""

    task: str
    split: str
    num_examples: int
    metrics: Dict[str, Any]
    predictions: Optional[List[Dict[str, Any]]] = None
    skipped: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"task": self.task, "split": self.split, "num_examples": self.num_examples, "metrics": self.metrics,
                "skipped": self.skipped, "notes": self.notes}


class Task:
    """One downstream task. ``paper_lr`` is the paper's learning rate for the Transformer and heads, scaled
    by the fine-tuning driver like the model's pre-training rate (see ``default_task_lr``) unless
    ``scale_paper_lr`` is False; the backbone's keeps the ratio it had in pre-training.
    ``decay_milestones`` are the fractions of training after which the rate is multiplied by 0.1 (the
    paper: the ends of epochs 6 and 9 of 12); None means linear warm-up and decay."""

    name = ""
    loss_keys: Tuple[str, ...] = ("loss",)
    model_class: Type[TaskModel] = TaskModel
    paper_lr = 1e-4
    scale_paper_lr = True
    decay_milestones: Optional[Tuple[float, ...]] = (6 / 12, 9 / 12)
    eval_split = "val"
    default_max_steps = 1000

    # ---- data
    def validate_options(self, options: Dict[str, Any]) -> None:
        """Check the task's own options (``task_options`` of the fine-tuning driver) before any work is
        done, raising ValueError or TypeError naming the bad one. Tasks without options check nothing."""

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        raise NotImplementedError

    def tokenizer_texts(self, records: Sequence[Any]) -> Iterable[str]:
        """Texts to train a vocabulary on when fine-tuning starts from a preset, not a checkpoint."""
        raise NotImplementedError

    def training_dataset(self, records: Sequence[Any], transform: ImageTransform, task_state: Dict[str, Any]) -> Dataset:
        raise NotImplementedError

    def build_batch(self, collated: Dict[str, Any], tokenizer: WordPieceTokenizer, generator: torch.Generator) -> TaskBatch:
        raise NotImplementedError

    # ---- model
    def build_model(self, config, task_state: Dict[str, Any]) -> TaskModel:
        return self.model_class(config, task_state)

    # ---- evaluation and inference
    def evaluate(self, model: TaskModel, tokenizer: WordPieceTokenizer, data_dir: Path, split: str,
                 device: torch.device, batch_size: int, scale) -> EvaluationResult:
        raise NotImplementedError

    def predict(self, model: TaskModel, tokenizer: WordPieceTokenizer, images: List[torch.Tensor],
                sizes: List[Tuple[int, int]], text: Optional[str], top_k: int) -> Dict[str, Any]:
        raise NotImplementedError


def collate_task_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Image keys padded into NestedTensors, ``target`` tensors stacked, ``skipped`` lists joined, the
    rest kept as lists."""
    batch: Dict[str, Any] = {"skipped": [entry for s in samples for entry in s.get("skipped", [])]}
    for key in samples[0]:
        if key == "skipped":
            continue
        values = [s[key] for s in samples]
        if key in IMAGE_KEYS:
            batch[key] = nested_tensor_from_images(values)
        elif key == "target" and isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def readable_samples(dataset: Dataset, batch_size: int, skipped: Dict[str, int]):
    """Evaluation batches of ``dataset`` in order, unreadable records dropped and counted into ``skipped``."""
    pending: List[Dict[str, Any]] = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if isinstance(sample, SkippedSample):
            skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            yield collate_task_samples(pending)
            pending = []
    if pending:
        yield collate_task_samples(pending)


class StepDecay:
    """Learning-rate multiplier: 1, times 0.1 after each milestone (fractions of ``max_steps``). A class,
    not a lambda, so that the schedule is a plain function of the step."""

    def __init__(self, milestones: Sequence[float], max_steps: int, factor: float = 0.1) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")
        if any(not 0 < m <= 1 for m in milestones):
            raise ValueError(f"milestones: expected fractions in (0, 1], got {list(milestones)}")
        self.steps = sorted(max(1, round(m * max_steps)) for m in milestones)
        self.factor = factor

    def __call__(self, step: int) -> float:
        return self.factor ** sum(step >= boundary for boundary in self.steps)
