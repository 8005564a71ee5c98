"""Image-text retrieval (Flickr30k): a cross-encoder scores each (image, caption) pair on [CLS] of their
joint encoding, as UNITER and the paper do. Training mines hard negatives inside the batch and applies the
circle loss in both directions; evaluation scores every image against every caption of the split and reports
recall at 1, 5 and 10."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.image_records import ImageRecordDataset, ImageRecordView
from fastvlp.data.readers.karpathy import read_flickr30k
from fastvlp.data.transforms import ImageTransform, eval_transform
from fastvlp.eval.retrieval import fill_score_matrix, retrieval_recall
from fastvlp.models.backbone import VisualTokens
from fastvlp.models.task_heads import RetrievalHead
from fastvlp.models.task_losses import circle_loss, hard_negative_indices
from fastvlp.train.tasks.base import EvaluationResult, Task, TrainingData, readable_samples
from fastvlp.train.tasks.batch import TaskBatch, TaskOutput, images_and_mask
from fastvlp.train.tasks.model import ENCODER_PARTS, TaskModel
from fastvlp.train.tasks.text_batch import encode_texts

DEFAULT_NUM_NEGATIVES = 3
METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def _check_num_negatives(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_negatives: expected a positive int, got {value!r}")
    return value


def select_visual(visual: VisualTokens, rows: Tensor) -> VisualTokens:
    """The image tokens of the batch rows ``rows`` (an int64 index tensor; rows may repeat)."""
    return VisualTokens(visual.features.index_select(0, rows), visual.padding_mask.index_select(0, rows),
                        visual.pos.index_select(0, rows), visual.spatial_shape)


def mine_hard_negatives(scores: Tensor, num_negatives: int, image_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Hard negatives of a batch of ``B`` images, each with one caption: ``scores`` ``[B, B]`` holds
    ``score(image i, caption j)`` (the positives on the diagonal). Returns int64 ``[B, K]`` indices: for
    each image its ``K`` highest-scoring captions of other images, and for each caption its ``K``
    highest-scoring other images. ``image_ids`` ``[B]`` (optional) marks rows that hold the same image (a
    batch can repeat one when an unreadable record was replaced): such pairs are ranked last, since they
    are positives too."""
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a [B, B] tensor, got {getattr(scores, 'shape', type(scores))}")
    if image_ids is not None:
        if not isinstance(image_ids, Tensor) or image_ids.shape != scores.shape[:1]:
            shape = getattr(image_ids, "shape", type(image_ids))
            raise ValueError(f"image_ids: expected a tensor [{scores.shape[0]}], got {shape}")
        same = image_ids[:, None].to(scores.device) == image_ids[None, :].to(scores.device)
        scores = scores.masked_fill(same, -torch.inf)
    return hard_negative_indices(scores, num_negatives), hard_negative_indices(scores.t(), num_negatives)


class RetrievalModel(TaskModel):
    """``task_state["num_negatives"]``: hard negatives per image and per caption in training (default 3,
    at most the batch size minus one)."""

    task_name = "retrieval"
    kept_parts = ENCODER_PARTS + ("contrastive_head",)

    def __init__(self, config, task_state=None) -> None:
        super().__init__(config, task_state)
        self.task_state["num_negatives"] = _check_num_negatives(self.task_state.get("num_negatives", DEFAULT_NUM_NEGATIVES))
        self.head = RetrievalHead(config.d_model)

    def pair_logits(self, visual: VisualTokens, input_ids: Tensor, text_attention_mask: Tensor,
                    image_rows: Tensor, text_rows: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """Score logits ``[N]`` of the pairs (``visual`` row ``image_rows[n]``, text row ``text_rows[n]``),
        ``chunk_size`` pairs per encoder pass (all at once when None)."""
        if image_rows.shape != text_rows.shape or image_rows.dim() != 1:
            raise ValueError(f"image_rows, text_rows: expected two [N] index tensors, "
                             f"got {list(image_rows.shape)}, {list(text_rows.shape)}")
        step = image_rows.numel() if chunk_size is None else chunk_size
        scores = []
        for start in range(0, image_rows.numel(), max(step, 1)):
            images, texts = image_rows[start:start + step], text_rows[start:start + step]
            ids, mask = input_ids.index_select(0, texts), text_attention_mask.index_select(0, texts)
            used = mask.any(0).nonzero()  # drop the trailing columns that are padding in every row of the chunk
            length = int(used.max()) + 1 if used.numel() else ids.shape[1]
            encoded = self.vlp.encode(None, None, ids[:, :length], mask[:, :length],
                                      visual_tokens=select_visual(visual, images))
            scores.append(self.head(encoded.cls_hidden))
        return torch.cat(scores) if scores else image_rows.new_zeros(0, dtype=torch.float32)

    def score_grid(self, visual: VisualTokens, input_ids: Tensor, text_attention_mask: Tensor,
                   chunk_size: Optional[int] = None) -> Tensor:
        """``[num_images, num_texts]`` logits of every image of ``visual`` against every text."""
        num_images, num_texts = visual.features.shape[0], input_ids.shape[0]
        device = input_ids.device
        image_rows = torch.arange(num_images, device=device).repeat_interleave(num_texts)
        text_rows = torch.arange(num_texts, device=device).repeat(num_images)
        scores = self.pair_logits(visual, input_ids, text_attention_mask, image_rows, text_rows, chunk_size)
        return scores.view(num_images, num_texts)

    def forward(self, batch: TaskBatch) -> TaskOutput:
        """One backbone pass; the ``B x B`` scores without gradients to mine ``K`` hard negatives per image
        and per caption; then the ``B`` positives and ``2BK`` negatives again with gradients, and the circle
        loss on their sigmoid, the mean of the image-to-text and text-to-image directions. With
        ``config.contrastive_loss_weight`` > 0 the in-batch contrastive loss of the ``B`` pairs
        (:meth:`E2EVLP.contrastive_loss`) is added with that weight: it trains the encoder to align what
        the text says with what the image shows, which the [CLS] score then learns to compare
        (docs/learning.md). ``logits``: the mined ``[B, B]`` score matrix."""
        self.clear_attention_paths()
        ids, mask = batch["input_ids"], batch["text_attention_mask"]
        size = ids.shape[0]
        if size < 2:
            raise ValueError(f"batch: retrieval training needs at least 2 images per batch for negatives, got {size}")
        k = min(self.task_state["num_negatives"], size - 1)
        visual = self.vlp.extract_visual_tokens(batch["images"], batch["pixel_mask"])
        with torch.no_grad():
            detached = VisualTokens(visual.features.detach(), visual.padding_mask, visual.pos.detach(), visual.spatial_shape)
            # passes no larger than the one with gradients below
            grid = self.score_grid(detached, ids, mask, chunk_size=size * (1 + 2 * k))
        text_negatives, image_negatives = mine_hard_negatives(grid.float(), k, batch.get("image_ids"))
        rows = torch.arange(size, device=ids.device)
        image_rows = torch.cat((rows, rows.repeat_interleave(k), image_negatives.flatten()))
        text_rows = torch.cat((rows, text_negatives.flatten(), rows.repeat_interleave(k)))
        similarity = torch.sigmoid(self.pair_logits(visual, ids, mask, image_rows, text_rows).float())
        positive = similarity[:size]
        image_to_text = circle_loss(positive, similarity[size:size * (1 + k)].view(size, k))
        text_to_image = circle_loss(positive, similarity[size * (1 + k):].view(size, k))
        retrieval = (image_to_text + text_to_image) / 2
        losses = {"loss_retrieval": retrieval}
        loss = retrieval
        if self.vlp.contrastive_head is not None:
            losses["loss_contrastive"] = self.vlp.contrastive_loss(visual, ids, mask, batch.get("image_ids"))
            loss = loss + self.config.contrastive_loss_weight * losses["loss_contrastive"]
        return TaskOutput(loss, losses, grid)


class RetrievalSamples(ImageRecordView):
    """Sample i: image i of ``records`` (an :class:`ImageRecordDataset` sample, objects ignored), its
    ``index``, and with ``draw_caption`` one of its captions drawn with ``torch.randint`` (under
    :class:`SeededSamples` the draw is a function of the seed, epoch and index)."""

    def __init__(self, records: Sequence, transform: ImageTransform, draw_caption: bool = True) -> None:
        super().__init__(ImageRecordDataset(records, transform))
        if draw_caption and any(not r.captions for r in self.records):
            raise ValueError("records: expected every image to have a caption")
        self.draw_caption = draw_caption

    def view(self, sample, index: int):
        out = {"image": sample["image"], "size": sample["size"], "image_id": sample["image_id"], "index": index}
        if self.draw_caption:
            captions = sample["captions"]
            out["caption"] = captions[int(torch.randint(len(captions), ()))]
        return out


def _records(data_dir: Path, split: str):
    return read_flickr30k(Path(data_dir) / "flickr30k", splits=[split])


def _pad_tokens(tokens: List[Tensor], positions: List[Tensor]) -> VisualTokens:
    """Per-image token sequences ``[L_i, d]`` padded into one batch (padding masked), so that images of
    different sizes share an encoder pass."""
    length = max(t.shape[0] for t in tokens)
    features = tokens[0].new_zeros(len(tokens), length, tokens[0].shape[1])
    pos = positions[0].new_zeros(len(tokens), length, positions[0].shape[1])
    mask = torch.ones(len(tokens), length, dtype=torch.bool, device=tokens[0].device)
    for row, (t, p) in enumerate(zip(tokens, positions)):
        features[row, : t.shape[0]], pos[row, : t.shape[0]], mask[row, : t.shape[0]] = t, p, False
    return VisualTokens(features, mask, pos, (1, length))


class RetrievalTask(Task):
    name = "retrieval"
    loss_keys = ("loss", "loss_retrieval", "loss_contrastive")
    model_class = RetrievalModel
    paper_lr = 5e-5
    decay_milestones = None
    eval_split = "test"
    default_max_steps = 2000

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        result = _records(data_dir, "train")
        value = options.get("num_negatives")
        num_negatives = DEFAULT_NUM_NEGATIVES if value is None else _check_num_negatives(value)
        return TrainingData(list(result.records), result.skips, {"num_negatives": num_negatives})

    def tokenizer_texts(self, records):
        return (caption for r in records for caption in r.captions)

    def training_dataset(self, records, transform, task_state):
        return RetrievalSamples(records, transform)

    def build_batch(self, collated, tokenizer, generator) -> TaskBatch:
        images, pixel_mask = images_and_mask(collated)
        input_ids, attention = encode_texts(tokenizer, collated["caption"])
        return TaskBatch(images=images, pixel_mask=pixel_mask, input_ids=input_ids, text_attention_mask=attention,
                         image_ids=torch.tensor(collated["image_id"], dtype=torch.int64))

    @torch.inference_mode()
    def score_matrix(self, model, tokenizer, records, device, batch_size: int, scale,
                     skipped: Optional[Dict[str, int]] = None) -> Tuple[Tensor, Tensor, List[int]]:
        """Logits ``[num_images, num_texts]`` of every readable image of ``records`` against every caption
        of those images, the image index of each caption ``[num_texts]`` and the indices of the records
        scored. Each image goes through the backbone once, in groups of equal size (no padding, so an
        image's tokens do not depend on the others in its batch); pairs are then scored about
        ``batch_size`` per encoder pass."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        skipped = {} if skipped is None else skipped
        model.eval()
        dataset = RetrievalSamples(records, eval_transform(scale), draw_caption=False)
        tokens: List[Tensor] = []  # per image: its tokens [h * w, d] ...
        shapes: List[Tuple[int, int]] = []  # ... and its feature map's (h, w)
        positions: Dict[Tuple[int, int], Tensor] = {}  # sine encodings depend on the feature map's size only
        kept: List[int] = []
        for collated in readable_samples(dataset, batch_size, skipped):
            by_size: Dict[Tuple[int, int], List[int]] = {}
            for row, size in enumerate(collated["size"]):
                by_size.setdefault(tuple(int(v) for v in size), []).append(row)
            encoded: Dict[int, Tuple[Tensor, Tuple[int, int]]] = {}
            for (height, width), rows in by_size.items():
                images = collated["image"].tensors[rows, :, :height, :width].to(device)
                no_padding = torch.zeros(images.shape[0], height, width, dtype=torch.bool, device=device)
                visual = model.vlp.extract_visual_tokens(images, no_padding)
                positions.setdefault(visual.spatial_shape, visual.pos[0])
                encoded.update((row, (features, visual.spatial_shape)) for row, features in zip(rows, visual.features))
            for row in range(len(collated["size"])):  # back in record order
                tokens.append(encoded[row][0])
                shapes.append(encoded[row][1])
            kept.extend(collated["index"])
        if not kept:
            raise ValueError("records: no image of the split could be read")
        texts = [caption for index in kept for caption in dataset.records[index].captions]
        text_to_image = torch.tensor([i for i, index in enumerate(kept) for _ in dataset.records[index].captions],
                                     dtype=torch.int64)
        input_ids, attention = encode_texts(tokenizer, texts)
        input_ids, attention = input_ids.to(device), attention.to(device)

        def score_block(image_indices: Tensor, text_indices: Tensor) -> Tensor:
            rows = image_indices.tolist()
            visual = _pad_tokens([tokens[i] for i in rows], [positions[shapes[i]] for i in rows])
            return model.score_grid(visual, input_ids.index_select(0, text_indices), attention.index_select(0, text_indices))

        text_block = min(batch_size, 32)
        image_block = max(1, batch_size // text_block)
        scores = fill_score_matrix(score_block, len(kept), len(texts), image_batch_size=image_block,
                                   text_batch_size=text_block, device=device)
        return scores, text_to_image, kept

    def evaluate(self, model, tokenizer, data_dir, split, device, batch_size, scale) -> EvaluationResult:
        """Recall at 1, 5, 10 of text retrieval (``txt_r*``: each image ranks every caption) and image
        retrieval (``img_r*``: each caption ranks every image) and their mean ``r_mean``, as fractions.
        ``batch_size`` is the number of (image, caption) pairs per encoder pass. No predictions."""
        result = _records(data_dir, split)
        skipped = dict(result.skips.counts)
        if not result.records:
            raise ValueError(f"split: no readable {split!r} images with captions under {Path(data_dir) / 'flickr30k'}")
        scores, text_to_image, kept = self.score_matrix(model, tokenizer, result.records, device, batch_size, scale, skipped)
        recall = retrieval_recall(scores.float().cpu(), text_to_image)
        metrics = {key: float(recall[key]) for key in METRIC_KEYS}
        notes = [f"{len(kept)} images scored against {len(text_to_image)} captions"]
        return EvaluationResult(self.name, split, len(kept), metrics, None, skipped, notes)

    @torch.inference_mode()
    def predict(self, model, tokenizer, images, sizes, text: Optional[str], top_k: int) -> Dict[str, Any]:
        """``score``: the sigmoid of the pair's retrieval score (higher = a better match)."""
        if not images:
            raise ValueError("images: retrieval needs an image")
        if not text:
            raise ValueError("text: retrieval needs a caption to score against the image")
        nested = nested_tensor_from_images(images[:1])
        input_ids, attention = encode_texts(tokenizer, [text])
        device = next(model.parameters()).device
        encoded = model.vlp.encode(nested.tensors.to(device), nested.mask.to(device), input_ids.to(device), attention.to(device))
        score = float(torch.sigmoid(model.head(encoded.cls_hidden).float())[0])
        return {"task": "retrieval", "text": text, "score": round(score, 6)}
