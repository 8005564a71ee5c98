"""The inputs of a pre-training step, and how a batch of matched (image, text) pairs becomes one: half of
the texts moved to another image of the batch (image-text matching) and 15% of the tokens masked (MLM)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastvlp.models.masking import IGNORE_INDEX, mask_tokens
from fastvlp.nn.matched_pairs import PaddedTargets

Target = Optional[Dict[str, Tensor]]


@dataclass
class PretrainingBatch:
    """One pre-training batch; every task input but the image and text is optional (a task without its
    inputs does not run).

    ``images`` ``[B, 3, H, W]`` float; ``pixel_mask`` bool ``[B, H, W]`` (True = padding).
    ``input_ids`` ``[B, T]`` int64, the encoder text ``[CLS] ... [SEP]`` (already masked for MLM);
    ``text_attention_mask`` bool ``[B, T]`` (True = real token); ``token_type_ids`` ``[B, T]`` (default 0).
    ``mlm_labels`` ``[B, T]``: original ids at masked positions, -100 elsewhere.
    ``itm_labels`` ``[B]`` int64: 1 = the text belongs to the image, 0 = mismatched.
    ``caption_ids`` ``[B, Tc]`` the caption ``[CLS] ... [SEP]`` to generate from the image alone, with
    ``caption_attention_mask`` bool ``[B, Tc]`` (True = real token).
    ``targets``: one dict per image (``labels`` ``[N]``, ``boxes`` ``[N, 4]`` normalised cxcywh,
    optionally ``attributes`` ``[N, A]`` multi-hot), or None for an image without detection annotations.
    Detection runs on the rows whose pair is matched and whose target is not None.
    ``detection_rows`` ``[M]`` int64 and ``padded_targets`` (those rows' targets padded to a fixed length, a
    :class:`~fastvlp.nn.matched_pairs.PaddedTargets`) are that choice made beforehand on the host
    (:func:`~fastvlp.models.static_batch.with_static_targets`), so that the forward reads nothing back from the
    device and a batch of fixed shapes can be replayed in a CUDA graph; give both or neither.
    """

    images: Tensor
    pixel_mask: Tensor
    input_ids: Tensor
    text_attention_mask: Tensor
    token_type_ids: Optional[Tensor] = None
    mlm_labels: Optional[Tensor] = None
    itm_labels: Optional[Tensor] = None
    caption_ids: Optional[Tensor] = None
    caption_attention_mask: Optional[Tensor] = None
    targets: Optional[List[Target]] = None
    detection_rows: Optional[Tensor] = None
    padded_targets: Optional[PaddedTargets] = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first field of the wrong type or shape."""
        if not isinstance(self.images, Tensor) or self.images.dim() != 4 or not self.images.is_floating_point():
            raise ValueError(f"images: expected a float tensor [B, 3, H, W], got {getattr(self.images, 'shape', type(self.images))}")
        batch = self.images.shape[0]
        if not isinstance(self.pixel_mask, Tensor) or self.pixel_mask.dtype != torch.bool:
            raise TypeError("pixel_mask: expected a bool tensor [B, H, W] (True = padding)")
        if self.pixel_mask.shape != (batch, *self.images.shape[2:]):
            raise ValueError(f"pixel_mask: expected shape {[batch, *self.images.shape[2:]]}, got {list(self.pixel_mask.shape)}")
        _check_ids("input_ids", self.input_ids, batch)
        _check_mask("text_attention_mask", self.text_attention_mask, self.input_ids.shape)
        if self.token_type_ids is not None:
            _check_ids("token_type_ids", self.token_type_ids, batch, self.input_ids.shape)
        if self.mlm_labels is not None:
            _check_ids("mlm_labels", self.mlm_labels, batch, self.input_ids.shape)
        if self.itm_labels is not None:
            if not isinstance(self.itm_labels, Tensor) or self.itm_labels.shape != (batch,) or self.itm_labels.is_floating_point():
                raise ValueError(f"itm_labels: expected an integer tensor [{batch}] (1 = matched)")
        if (self.caption_ids is None) != (self.caption_attention_mask is None):
            raise ValueError("caption_ids and caption_attention_mask: give both or neither")
        if self.caption_ids is not None:
            _check_ids("caption_ids", self.caption_ids, batch)
            if self.caption_ids.shape[1] < 2:
                raise ValueError("caption_ids: expected at least 2 tokens ([CLS] and one to predict)")
            _check_mask("caption_attention_mask", self.caption_attention_mask, self.caption_ids.shape)
        if self.targets is not None:
            if not isinstance(self.targets, (list, tuple)) or len(self.targets) != batch:
                raise ValueError(f"targets: expected a list of {batch} dicts or None")
            for index, target in enumerate(self.targets):
                if target is not None and (not isinstance(target, Mapping) or "labels" not in target or "boxes" not in target):
                    raise ValueError(f"targets[{index}]: expected None or a dict with 'labels' and 'boxes'")
        if (self.detection_rows is None) != (self.padded_targets is None):
            raise ValueError("detection_rows and padded_targets: give both or neither")
        if self.detection_rows is not None:
            rows = self.detection_rows
            if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
                raise ValueError(f"detection_rows: expected an int64 tensor [M], got {getattr(rows, 'shape', type(rows))}")
            if not isinstance(self.padded_targets, PaddedTargets) or self.padded_targets.labels.shape[0] != rows.shape[0]:
                raise ValueError(f"padded_targets: expected a PaddedTargets of {rows.shape[0]} rows like detection_rows")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PretrainingBatch":
        """From a dict with the field names as keys (other keys are ignored)."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values: expected a mapping, got {type(values).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def to(self, device, non_blocking: bool = False) -> "PretrainingBatch":
        """A copy with every tensor (targets included) on ``device``."""

        def move(value):
            if isinstance(value, (Tensor, PaddedTargets)):
                return value.to(device, non_blocking=non_blocking)
            if isinstance(value, Mapping):
                return {key: move(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [move(item) for item in value]
            return value

        return PretrainingBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def _check_ids(name: str, ids, batch: int, shape=None) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor [B, T], got {getattr(ids, 'shape', type(ids))}")
    if ids.shape[0] != batch or (shape is not None and ids.shape != shape):
        raise ValueError(f"{name}: expected shape {list(shape) if shape is not None else [batch, 'T']}, got {list(ids.shape)}")


def _check_mask(name: str, mask, shape) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(f"{name}: expected a bool tensor of shape {list(shape)} (True = real token)")


def mismatch_texts(
    batch_size: int,
    *,
    generator: Optional[torch.Generator] = None,
    negative_ratio: float = 0.5,
    image_ids: Optional[Sequence[Any]] = None,
) -> Tuple[Tensor, Tensor]:
    """Choose which rows get another row's text, for image-text matching.

    ``floor(batch_size * negative_ratio)`` rows, drawn at random, are rolled by one among themselves
    (each takes the next chosen row's text); a single chosen row takes a random other row's text.
    Batches of one row stay matched. With ``image_ids``, a row whose new text comes from a row of the
    same image counts as matched.

    Returns ``(text_source, itm_labels)``, int64 ``[batch_size]`` on the CPU: row ``i`` gets the text of
    row ``text_source[i]``, and ``itm_labels[i]`` is 1 when that text belongs to its image.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(negative_ratio, bool) or not isinstance(negative_ratio, (int, float)) or not 0.0 <= negative_ratio <= 1.0:
        raise ValueError(f"negative_ratio: expected a number in [0, 1], got {negative_ratio!r}")
    if image_ids is not None and len(image_ids) != batch_size:
        raise ValueError(f"image_ids: expected {batch_size} ids, got {len(image_ids)}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator: expected a CPU generator (the choice is made on the host)")
    source = torch.arange(batch_size)
    count = int(batch_size * negative_ratio) if batch_size > 1 else 0
    chosen = torch.randperm(batch_size, generator=generator)[:count]
    if count == 1:
        offset = 1 + int(torch.randint(batch_size - 1, (1,), generator=generator))
        source[chosen] = (chosen + offset) % batch_size
    elif count > 1:
        source[chosen] = chosen.roll(-1)
    labels = (source == torch.arange(batch_size)).long()
    if image_ids is not None:
        same_image = torch.tensor([image_ids[i] == image_ids[int(j)] for i, j in enumerate(source)], dtype=torch.bool)
        labels = torch.where(same_image, torch.ones_like(labels), labels)
    return source, labels


def make_pretraining_batch(
    images: Tensor,
    pixel_mask: Tensor,
    input_ids: Tensor,
    text_attention_mask: Tensor,
    *,
    special_token_ids: Iterable[int],
    mask_token_id: int,
    vocab_size: int,
    caption_ids: Optional[Tensor] = None,
    caption_attention_mask: Optional[Tensor] = None,
    targets: Optional[Sequence[Target]] = None,
    image_ids: Optional[Sequence[Any]] = None,
    generator: Optional[torch.Generator] = None,
    mlm_probability: float = 0.15,
    itm_negative_ratio: float = 0.5,
) -> PretrainingBatch:
    """Build a :class:`PretrainingBatch` from ``B`` matched pairs: texts mismatched with
    :func:`mismatch_texts`, then masked with :func:`~fastvlp.models.masking.mask_tokens`; MLM labels are
    kept on matched rows only. Images, captions and targets stay with their rows. ``generator``
    must be a CPU generator; every tensor stays on the device it came on."""
    batch = images.shape[0] if isinstance(images, Tensor) else -1
    _check_ids("input_ids", input_ids, batch)
    _check_mask("text_attention_mask", text_attention_mask, input_ids.shape)
    source, itm_labels = mismatch_texts(batch, generator=generator, negative_ratio=itm_negative_ratio, image_ids=image_ids)
    source = source.to(input_ids.device)
    input_ids = input_ids.index_select(0, source)
    text_attention_mask = text_attention_mask.index_select(0, source)
    masked_ids, mlm_labels = mask_tokens(
        input_ids,
        text_attention_mask,
        special_token_ids=special_token_ids,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        generator=generator,
        probability=mlm_probability,
    )
    itm_labels = itm_labels.to(input_ids.device)
    mlm_labels = mlm_labels.masked_fill(itm_labels[:, None] == 0, IGNORE_INDEX)
    return PretrainingBatch(
        images=images,
        pixel_mask=pixel_mask,
        input_ids=masked_ids,
        text_attention_mask=text_attention_mask,
        mlm_labels=mlm_labels,
        itm_labels=itm_labels,
        caption_ids=caption_ids,
        caption_attention_mask=caption_attention_mask,
        targets=None if targets is None else list(targets),
    )
