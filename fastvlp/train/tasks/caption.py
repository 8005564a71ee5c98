"""Image captioning: the shared decoder generates the caption from an image-only encoder pass, trained
with label-smoothed (0.1) token cross-entropy and decoded by beam search (beam 4, GNMT length penalty 0.9;
``num_beams=1`` is greedy). It reads the Karpathy split (``dataset_coco.json``, wherever
:func:`read_coco_karpathy` finds it) when present, otherwise COCO's captions files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from fastvlp.data.datasets.image_records import ImageRecordDataset, ImageRecordView
from fastvlp.data.readers.coco import read_coco_captions
from fastvlp.data.readers.karpathy import read_coco_karpathy
from fastvlp.data.skips import ReadResult
from fastvlp.data.transforms import eval_transform
from fastvlp.eval.caption_metrics import caption_scores
from fastvlp.eval.result_files import caption_results
from fastvlp.models.generation import generate_captions
from fastvlp.models.masking import IGNORE_INDEX
from fastvlp.models.task_losses import label_smoothed_token_loss
from fastvlp.train.tasks.base import EvaluationResult, Task, TrainingData, readable_samples
from fastvlp.train.tasks.batch import TaskBatch, TaskOutput, images_and_mask
from fastvlp.train.tasks.model import ENCODER_PARTS, TaskModel
from fastvlp.train.tasks.text_batch import encode_texts

LABEL_SMOOTHING = 0.1
NUM_BEAMS = 4
LENGTH_PENALTY = 0.9
MAX_CAPTION_TOKENS = 20  # at most; a model with a shorter max_text_len generates up to that
CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider", "distinct")


class CaptionModel(TaskModel):
    """The decoder and its caption head are E2E-VLP's own (pre-trained on captioning); no new head."""

    task_name = "caption"
    kept_parts = ENCODER_PARTS + ("decoder", "caption_head")

    def forward(self, batch: TaskBatch) -> TaskOutput:
        self.clear_attention_paths()
        encoded = self.vlp.encode_image_only(batch["images"], batch["pixel_mask"])
        ids, mask = batch["caption_ids"], batch["caption_attention_mask"]
        logits = self.vlp.caption_logits(encoded, ids[:, :-1], mask[:, :-1])
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        loss = label_smoothed_token_loss(logits, labels, smoothing=LABEL_SMOOTHING)
        return TaskOutput(loss, {"loss_cap": loss}, logits)

    def generate(self, images, pixel_mask, tokenizer, num_beams: int = NUM_BEAMS, max_length: Optional[int] = None):
        """Caption strings for ``images`` (beam search by default; ``num_beams=1`` is greedy) of at most
        ``max_length`` tokens (see :func:`generation_settings`)."""
        num_beams, max_length = generation_settings(self.config, num_beams, max_length)
        ids = generate_captions(
            self.vlp, images, pixel_mask, bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
            max_length=max_length, num_beams=num_beams, length_penalty=LENGTH_PENALTY, use_cache=True,
        )
        return [tokenizer.decode(row) for row in ids]


def generation_settings(config, num_beams: int = NUM_BEAMS, max_length: Optional[int] = None) -> Tuple[int, int]:
    """``(num_beams, max_length)`` checked against the model's ``config``; ``max_length`` None is
    ``MAX_CAPTION_TOKENS``, or the model's ``max_text_len`` when that is shorter (the learned positions
    bound the caption)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected a positive int (1 decodes greedily), got {num_beams!r}")
    limit = config.max_text_len
    if max_length is None:
        return num_beams, min(MAX_CAPTION_TOKENS, limit)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
        raise ValueError(f"max_length: expected an int in [1, {limit}] (the model's max_text_len), got {max_length!r}")
    return num_beams, max_length


class _OneCaptionPerImage(ImageRecordView):
    """An image with one of its captions, drawn with torch's RNG (seeded per sample by SeededSamples)."""

    def __init__(self, records, transform) -> None:
        super().__init__(ImageRecordDataset(records, transform))

    def view(self, sample, index: int):
        captions = sample["captions"]
        return {"image": sample["image"], "caption": captions[int(torch.randint(len(captions), ()))],
                "image_id": sample["image_id"]}


def _read_records(data_dir: Path, split: str, coco_split: Optional[str] = None) -> Tuple[ReadResult, Optional[str]]:
    """The records of :func:`read_caption_records` (COCO's ``coco_split``, default ``split``, when there is
    no Karpathy file), and None when they are Karpathy's, else why not."""
    coco = Path(data_dir) / "coco"
    try:
        return read_coco_karpathy(coco, ["train", "restval"] if split == "train" else [split]), None
    except FileNotFoundError as error:
        # The reader's own lookup decides, and its message names every place it tried. (Without coco/
        # at all, COCO's reader below fails as well.)
        missing = str(error)
    return read_coco_captions(coco, coco_split or split), missing


def read_caption_records(data_dir: Path, split: str) -> ReadResult:
    """The captioned images of ``split``: Karpathy's (``train`` also takes ``restval``) when
    :func:`read_coco_karpathy` finds ``dataset_coco.json`` (in ``coco/``, ``coco/karpathy/`` or
    ``coco/annotations/``), else COCO's own captions file of that split."""
    return _read_records(data_dir, split)[0]


def most_frequent_caption(train_records: Sequence) -> str:
    """The most frequent caption of the records (lower-cased; ties go to the alphabetically first)."""
    counts = Counter(c.strip().lower() for r in train_records for c in r.captions)
    if not counts:
        raise ValueError("train_records: expected at least one caption")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def caption_baseline(train_records: Sequence, eval_records: Sequence) -> Dict[str, float]:
    """Scores of the trivial baseline: the training set's most frequent caption, given for every image."""
    top = most_frequent_caption(train_records)
    references = {r.image_id: list(r.captions) for r in eval_records}
    scores = caption_scores({image_id: top for image_id in references}, references)
    return {name: float(scores[name]) for name in CAPTION_METRICS if name in scores}


class CaptionTask(Task):
    name = "caption"
    loss_keys = ("loss", "loss_cap")
    model_class = CaptionModel
    eval_split = "test"  # Karpathy's; COCO's val when the data has no Karpathy file
    default_max_steps = 3000

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        result = read_caption_records(data_dir, "train")
        return TrainingData([r for r in result.records if r.captions], result.skips, {})

    def tokenizer_texts(self, records):
        return (c for r in records for c in r.captions)

    def training_dataset(self, records, transform, task_state):
        return _OneCaptionPerImage(records, transform)

    def build_batch(self, collated, tokenizer, generator) -> TaskBatch:
        images, pixel_mask = images_and_mask(collated)
        caption_ids, caption_mask = encode_texts(tokenizer, collated["caption"])
        return TaskBatch(images=images, pixel_mask=pixel_mask, caption_ids=caption_ids, caption_attention_mask=caption_mask)

    @torch.inference_mode()
    def evaluate(self, model, tokenizer, data_dir, split, device, batch_size, scale, num_beams: int = NUM_BEAMS,
                 max_length: Optional[int] = None) -> EvaluationResult:
        """The caption metrics of the captions generated for ``split``'s images; ``test`` is COCO's ``val``
        when the data has no Karpathy file. ``num_beams`` and ``max_length``: see :func:`generation_settings`."""
        num_beams, max_length = generation_settings(model.config, num_beams, max_length)  # before any work
        notes = []
        result, missing = _read_records(data_dir, split, "val" if split == "test" else split)
        if missing is not None and split == "test":
            split = "val"
            notes.append(f"evaluated on COCO's val captions ({missing})")
        dataset = ImageRecordDataset(result.records, eval_transform(scale))
        references = {r.image_id: list(r.captions) for r in result.records}
        predictions: Dict[int, str] = {}
        skipped = dict(result.skips.counts)
        model.eval()
        for collated in readable_samples(dataset, batch_size, skipped):
            images, pixel_mask = images_and_mask(collated)
            captions = model.generate(images.to(device), pixel_mask.to(device), tokenizer, num_beams, max_length)
            predictions.update(zip(collated["image_id"], captions))
        metrics: Dict[str, Any] = {}
        if predictions:
            scores = caption_scores(predictions, {k: references[k] for k in predictions})
            metrics = {name: float(scores[name]) for name in CAPTION_METRICS if name in scores}
            notes += [f"{name}: {reason}" for name, reason in scores.get("skipped", {}).items()]
            notes.append(f"captions tokenised by the {scores.get('tokenizer')} tokenizer")
        else:
            notes.append(f"split {split!r} has no readable images: no captions generated, metrics not computed")
        return EvaluationResult(self.name, split, len(predictions), metrics, caption_results(predictions), skipped, notes)

    @torch.inference_mode()
    def predict(self, model, tokenizer, images, sizes, text: Optional[str], top_k: int, num_beams: int = NUM_BEAMS,
                max_length: Optional[int] = None) -> Dict[str, Any]:
        """The caption of ``images[0]`` (``text`` and ``top_k`` are not used); ``num_beams`` and
        ``max_length``: see :func:`generation_settings`."""
        from fastvlp.data.collate import nested_tensor_from_images

        num_beams, max_length = generation_settings(model.config, num_beams, max_length)
        nested = nested_tensor_from_images(images[:1])
        device = next(model.parameters()).device
        caption = model.generate(nested.tensors.to(device), nested.mask.to(device), tokenizer, num_beams, max_length)[0]
        return {"task": "caption", "caption": caption}
