"""Result files in the formats the official evaluation servers and tools read.

* VQA: ``[{"question_id": int, "answer": str}]``
* COCO captions: ``[{"image_id": int, "caption": str}]``
* COCO detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h] in pixels, "score"}]``

Files are written atomically (a temporary file in the same folder, then renamed), with the mode a plain
``open(path, "w")`` would give a new file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    # os.umask can only be read by setting it, which briefly changes it for every thread; Linux shows it here.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: PathLike, records, indent: Optional[int] = None) -> None:
    """``records`` as JSON at ``path``, written to a temporary file in the same folder and then renamed, so
    that a stopped run never leaves half a file. The file gets mode ``0o666 & ~umask``, as with ``open``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(records, file, indent=indent)
        # mkstemp creates the file readable by its owner only, and the rename keeps that.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _id(name: str, value) -> Union[int, str]:
    # COCO and VQA ids are ints; tensors and numpy ints become plain ints so json can write them.
    if isinstance(value, Tensor):
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, str)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name}: expected an int id, got {type(value).__name__}")
    return value


def _text_results(mapping, argument: str, id_key: str, text_key: str, article: str, noun: str) -> List[Dict]:
    """``{id: text}`` -> ``[{id_key: id, text_key: text}]``, checking both sides of every pair."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{argument}: expected {article} {{{id_key}: {text_key}}} mapping")
    records = []
    for key, text in mapping.items():
        if not isinstance(text, str):
            raise TypeError(f"{argument}: {noun} {key!r}: expected str, got {type(text).__name__}")
        records.append({id_key: _id(id_key, key), text_key: text})
    return records


def vqa_results(answers: Mapping[object, str]) -> List[Dict]:
    """``{question_id: answer}`` -> the VQA result list."""
    return _text_results(answers, "answers", "question_id", "answer", "a", "question")


def caption_results(captions: Mapping[object, str]) -> List[Dict]:
    """``{image_id: caption}`` -> the COCO caption result list."""
    return _text_results(captions, "captions", "image_id", "caption", "an", "image")


def cxcywh_to_coco_xywh(boxes: Tensor, image_size: Sequence[float]) -> Tensor:
    """Normalised ``[N, 4]`` (cx, cy, w, h) boxes -> pixel (x, y, w, h) for an image of ``image_size``
    ``(height, width)`` (the original image's size, so predictions land on the annotation's scale)."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected a [N, 4] tensor, got {getattr(boxes, 'shape', type(boxes))}")
    if len(image_size) != 2 or any(float(side) <= 0 for side in image_size):
        raise ValueError(f"image_size: expected positive (height, width), got {image_size!r}")
    height, width = (float(side) for side in image_size)
    cx, cy, w, h = boxes.double().unbind(1)
    return torch.stack(((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height), 1)


def detection_results(
    image_id,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_size: Sequence[float],
    *,
    category_ids: Optional[Sequence[int]] = None,
) -> List[Dict]:
    """One image's detections -> COCO detection records.

    ``boxes`` normalised cxcywh ``[N, 4]``; ``scores`` ``[N]``; ``labels`` ``[N]`` class indices, mapped to
    COCO category ids through ``category_ids[label]`` when given (COCO's ids are not contiguous);
    ``image_size`` the original ``(height, width)``."""
    xywh = cxcywh_to_coco_xywh(boxes, image_size)
    if not isinstance(scores, Tensor) or scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores: expected a tensor [{boxes.shape[0]}]")
    if not isinstance(labels, Tensor) or labels.shape != (boxes.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor [{boxes.shape[0]}]")
    label_list = labels.tolist()
    if category_ids is not None:
        if any(not 0 <= label < len(category_ids) for label in label_list):
            raise ValueError(f"labels: expected indices into category_ids (0..{len(category_ids) - 1})")
        label_list = [int(category_ids[label]) for label in label_list]
    image_id = _id("image_id", image_id)
    return [
        {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        for box, score, label in zip(xywh.tolist(), scores.double().tolist(), label_list)
    ]


def write_vqa_results(path: PathLike, answers: Mapping[object, str]) -> None:
    write_json(path, vqa_results(answers))


def write_caption_results(path: PathLike, captions: Mapping[object, str]) -> None:
    write_json(path, caption_results(captions))


def write_detection_results(path: PathLike, detections: Sequence[Mapping]) -> None:
    """Write detection records (e.g. the concatenated :func:`detection_results` of every image)."""
    records = list(detections)
    for index, record in enumerate(records):
        if not isinstance(record, Mapping) or {"image_id", "category_id", "bbox", "score"} - record.keys():
            raise ValueError(f"detections[{index}]: expected image_id, category_id, bbox and score")
    write_json(path, records)
