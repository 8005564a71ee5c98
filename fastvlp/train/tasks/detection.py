"""Object detection (paper, section 5.8): DETR-style fine-tuning on COCO instances with new detection heads
over COCO's categories, the decoder's queries reading the encoding of the image and its paired caption
(or, with ``with_text`` off, of the image alone), scored with COCO box AP."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.label_space import LabelSpace
from fastvlp.data.datasets.image_records import ImageRecordDataset, ImageRecordView
from fastvlp.data.image_index import ImageIndex
from fastvlp.data.readers.coco import coco_annotation_file, read_coco_captions, read_coco_instances
from fastvlp.data.readers.common import MalformedRecord, load_json, optional_int, require, xywh_to_xyxy
from fastvlp.data.skips import (INVALID_BOX, MALFORMED_ANNOTATION, MISSING_IMAGE, NO_ANNOTATIONS, UNKNOWN_CATEGORY,
                                UNKNOWN_IMAGE, UNREADABLE_IMAGE, SkipCounter)
from fastvlp.data.transforms import eval_transform
from fastvlp.eval.detection_ap import coco_detection_ap
from fastvlp.eval.result_files import detection_results
from fastvlp.models.outputs import DetectionOutput
from fastvlp.models.query_groups import repeat_targets
from fastvlp.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from fastvlp.train.pretrain_data import OBJECTS_VOCAB
from fastvlp.train.tasks.base import EvaluationResult, Task, TrainingData, readable_samples
from fastvlp.train.tasks.batch import TaskBatch, TaskOutput, images_and_mask
from fastvlp.train.tasks.model import ENCODER_PARTS, TaskModel
from fastvlp.train.tasks.text_batch import encode_texts

# The criterion's last-layer terms that the training log follows (class_error and cardinality_error are
# DETR's logging values: they carry no gradient).
DETECTION_LOSS_KEYS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
# The token detection head's terms, logged when the model has one (``token_detection_loss_weight`` > 0).
TOKEN_LOSS_KEYS = ("loss_token", "loss_token_ce", "loss_token_bbox", "loss_token_giou")
AP_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
# The reader's skips of single annotations (as opposed to images).
_SKIPPED_OBJECTS = (MALFORMED_ANNOTATION, UNKNOWN_IMAGE, UNKNOWN_CATEGORY, INVALID_BOX)


def _check_categories(categories) -> List[Dict[str, Any]]:
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence) or not categories:
        raise ValueError("task_state: expected a non-empty 'categories' list of {'id', 'name'}")
    checked = []
    for index, entry in enumerate(categories):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) \
                or isinstance(entry.get("id"), bool) or not isinstance(entry.get("id"), int):
            raise ValueError(f"task_state['categories'][{index}]: expected {{'id': int, 'name': str}}, got {entry!r}")
        checked.append({"id": entry["id"], "name": entry["name"]})
    if len({c["id"] for c in checked}) != len(checked):
        raise ValueError("task_state['categories']: category ids must be unique")
    return checked


class DetectionModel(TaskModel):
    """``task_state["categories"]``: COCO's categories (``{"id", "name"}``) in the classifier's order;
    ``task_state["with_text"]`` (default True): encode ``[CLS] caption [SEP] image`` rather than the image
    alone. The head is the E2E-VLP's own detection heads (``vlp.detection_heads``) with a new classifier
    over these categories and no attribute head. From a pre-training checkpoint, the box MLP loads as it
    is (boxes do not depend on the label space, as when DETR is fine-tuned on new classes), and
    :meth:`initialise_from_pretraining` starts the classifier's rows of the categories that pre-training's
    label space names, and the no-object row, from the pre-trained classifier."""

    task_name = "detection"
    kept_parts = ENCODER_PARTS + ("decoder", "query_embed", "query_anchors", "detection_heads", "token_detection_head")
    fresh_parts = ("detection_heads.class_embed", "detection_heads.attribute_embed", "token_detection_head.class_embed")

    def __init__(self, config, task_state) -> None:
        super().__init__(config, task_state)
        categories = _check_categories(self.task_state.get("categories"))
        self.task_state["categories"] = categories
        self.with_text = bool(self.task_state.get("with_text", True))
        self.task_state["with_text"] = self.with_text
        self.category_ids = [c["id"] for c in categories]
        self.category_names = [c["name"] for c in categories]
        self.vlp.replace_detection_heads(num_classes=len(categories), num_attributes=0)

    @property
    def head(self):
        """The detection heads: class logits over the categories plus no-object, and boxes."""
        return self.vlp.detection_heads

    def initialise_from_pretraining(self, checkpoint: Path, stored: Mapping[str, Tensor]) -> List[str]:
        """With anchor queries (which a pre-training without them did not train), start the loaded box MLP
        at its reference boxes (:meth:`DetectionHeads.start_boxes_at_reference`). Copy pre-training's
        classifier rows into the new classifier: for each category whose name the
        checkpoint's label space (``objects_vocab.txt``) has, by the label space's own name matching, and
        for no-object. ``stored`` is the checkpoint's weights, keys prefixed ``vlp.``. Returns the names of
        the categories so initialised; the others keep their fresh rows. Nothing is copied when the
        checkpoint has no label space, its classifier does not match it, or it names none of the categories."""
        if self.vlp.query_anchors is not None and "vlp.query_anchors.anchors.weight" not in stored:
            # the pre-trained box MLP predicted absolute boxes; here it predicts offsets from anchors
            self.vlp.detection_heads.start_boxes_at_reference()
        vocab = Path(checkpoint) / OBJECTS_VOCAB
        weight = stored.get("vlp.detection_heads.class_embed.weight")
        bias = stored.get("vlp.detection_heads.class_embed.bias")
        classifier = self.vlp.detection_heads.class_embed
        if not vocab.is_file() or weight is None or bias is None:
            return []
        space = LabelSpace.from_vocab_file(vocab)
        if tuple(weight.shape) != (space.num_classes + 1, classifier.in_features) or tuple(bias.shape) != (space.num_classes + 1,):
            return []
        targets, sources, names = [], [], []
        for row, name in enumerate(self.category_names):
            index = space.get(name)
            if index is not None:
                targets.append(row)
                sources.append(index)
                names.append(name)
        if not names:
            return []
        targets.append(classifier.out_features - 1)  # no-object is the last row of both classifiers
        sources.append(space.no_object_index)
        with torch.no_grad():
            classifier.weight[targets] = weight[sources].to(classifier.weight)
            classifier.bias[targets] = bias[sources].to(classifier.bias)
        return names

    def detection_outputs(self, images, pixel_mask, input_ids=None, text_attention_mask=None,
                          *, aux_outputs: Optional[bool] = None) -> DetectionOutput:
        """The queries' predictions for a batch; ``input_ids`` and ``text_attention_mask`` (the captions)
        are required with ``with_text`` and ignored without it."""
        encoded = self._encode(images, pixel_mask, input_ids, text_attention_mask)
        return self.vlp.detect(encoded, aux_outputs=aux_outputs)

    def _encode(self, images, pixel_mask, input_ids, text_attention_mask):
        if self.with_text:
            if input_ids is None or text_attention_mask is None:
                raise ValueError("input_ids, text_attention_mask: a with_text detection model needs the captions")
            return self.vlp.encode(images, pixel_mask, input_ids, text_attention_mask)
        return self.vlp.encode_image_only(images, pixel_mask)

    def forward(self, batch: TaskBatch) -> TaskOutput:
        self.clear_attention_paths()
        encoded = self._encode(batch["images"], batch["pixel_mask"], batch.get("input_ids"),
                               batch.get("text_attention_mask"))
        outputs = self.vlp.detect(encoded)
        criterion = self.vlp.criterion
        losses = criterion(outputs.as_dict(), repeat_targets(batch["targets"], self.vlp.detection_query_groups))
        loss = criterion.weighted_total(losses)
        logged = {k: losses[k] for k in DETECTION_LOSS_KEYS if k in losses}
        if self.vlp.token_detection_head is not None:
            token_losses = self.vlp.token_detection_losses(encoded, batch["targets"])
            loss = loss + self.vlp.config.token_detection_loss_weight * token_losses["loss_token"]
            logged.update(token_losses)
        return TaskOutput(loss, logged, outputs.pred_logits)


# ---------------------------------------------------------------------------- post-processing


def postprocess_detections(pred_logits: Tensor, pred_boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """DETR's post-processing of one decoder layer's predictions: a softmax over the classes and
    no-object, then each query's score and label are the best real class (no-object dropped); every query
    is kept. ``pred_logits`` ``[B, Q, C + 1]``, ``pred_boxes`` ``[B, Q, 4]`` normalised cxcywh ->
    ``scores`` ``[B, Q]``, ``labels`` ``[B, Q]`` (0 .. C - 1) and the boxes clipped to the image (still
    normalised cxcywh)."""
    if not isinstance(pred_logits, Tensor) or pred_logits.dim() != 3 or pred_logits.shape[-1] < 2:
        raise ValueError("pred_logits: expected a [B, Q, C + 1] tensor with C >= 1, "
                         f"got {getattr(pred_logits, 'shape', pred_logits)}")
    if not isinstance(pred_boxes, Tensor) or pred_boxes.shape != (*pred_logits.shape[:2], 4):
        raise ValueError("pred_boxes: expected a [B, Q, 4] tensor like pred_logits, "
                         f"got {getattr(pred_boxes, 'shape', pred_boxes)}")
    probabilities = F.softmax(pred_logits.float(), dim=-1)
    scores, labels = probabilities[..., :-1].max(dim=-1)
    boxes = box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(pred_boxes.float()).clamp(0.0, 1.0))
    return scores, labels, boxes


def detections_to_coco(image_ids: Sequence, original_sizes: Sequence[Sequence[int]], pred_logits: Tensor,
                       pred_boxes: Tensor, category_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """COCO detection records (``bbox`` in the original image's pixels) of a batch of predictions, every
    query of every image, through :func:`postprocess_detections`."""
    scores, labels, boxes = postprocess_detections(pred_logits, pred_boxes)
    if len(image_ids) != scores.shape[0] or len(original_sizes) != scores.shape[0]:
        raise ValueError(f"image_ids, original_sizes: expected {scores.shape[0]} each, "
                         f"got {len(image_ids)} and {len(original_sizes)}")
    records: List[Dict[str, Any]] = []
    for row, (image_id, size) in enumerate(zip(image_ids, original_sizes)):
        records += detection_results(image_id, boxes[row].cpu(), scores[row].cpu(), labels[row].cpu(), size,
                                     category_ids=category_ids)
    return records


# ---------------------------------------------------------------------------- data


def _captions_by_image(coco_dir: Path, split: str, index: ImageIndex) -> Dict[int, Tuple[str, ...]]:
    result = read_coco_captions(coco_dir, split, skips=SkipCounter(), image_index=index)
    return {record.image_id: record.captions for record in result.records}


def _with_captions(records, captions: Mapping[int, Tuple[str, ...]]):
    return [dataclasses.replace(r, captions=captions.get(r.image_id, ())) for r in records]


def _accepted_box(annotation, images: Mapping[int, Mapping], category_ids) -> Optional[List[float]]:
    """The annotation's [x, y, w, h] when :func:`read_coco_instances` keeps it as an object, else None."""
    try:
        image_id = require(annotation, "image_id", int)
        category_id = require(annotation, "category_id", int)
        bbox = require(annotation, "bbox", list)
    except MalformedRecord:
        return None
    if len(bbox) != 4 or image_id not in images or category_id not in category_ids:
        return None
    image = images[image_id]
    if xywh_to_xyxy(*bbox, optional_int(image, "width"), optional_int(image, "height")) is None:
        return None
    return bbox


def _evaluation_ground_truth(path: Path, categories) -> Dict[str, Any]:
    """The instances file at ``path`` as COCOeval gets it: its images, the reader's ``categories`` and only
    the annotations that :func:`read_coco_instances` keeps (the skipped ones, e.g. a malformed ``bbox``,
    would make pycocotools fail). Images whose file is missing stay, so that they count as missed. Kept
    annotations are passed unchanged (their ``area`` sets COCO's size classes), apart from what COCOeval
    needs and the reader does not require: unique ids, ``iscrowd`` as 0/1 and, when absent, the box's area."""
    content = load_json(path)
    images: Dict[int, Mapping] = {}  # the entries the reader lists, whether or not their file is found
    for entry in content.get("images", []):
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) \
                and optional_int(entry, "id") is not None:
            images[entry["id"]] = entry
    category_ids = {c.id for c in categories}
    annotations: List[Dict[str, Any]] = []
    for annotation in content.get("annotations", []):
        bbox = _accepted_box(annotation, images, category_ids)
        if bbox is None:
            continue
        area = annotation.get("area")
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area):
            area = float(bbox[2] * bbox[3])
        # COCOeval indexes annotations by id, which the reader does not require to be unique.
        annotations.append(dict(annotation, id=len(annotations) + 1, iscrowd=int(bool(annotation.get("iscrowd", 0))),
                                area=area))
    return {"images": list(images.values()), "annotations": annotations,
            "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in categories]}


class DetectionSamples(ImageRecordView):
    """:class:`ImageRecordDataset` samples reduced to what detection trains on: ``image``, ``boxes``
    (normalised cxcywh), ``labels`` (class indices), ``image_id``, ``original_size`` and, with ``with_text``,
    ``caption``, one of the image's captions drawn with torch's RNG (which :class:`SeededSamples` seeds)."""

    def __init__(self, inner: ImageRecordDataset, with_text: bool) -> None:
        super().__init__(inner)
        self.with_text = bool(with_text)

    def view(self, sample, index: int):
        out = {key: sample[key] for key in ("image", "boxes", "labels", "image_id", "original_size")}
        if self.with_text:
            captions = sample["captions"]
            out["caption"] = captions[int(torch.randint(len(captions), (1,)))] if captions else ""
        return out


class DetectionTask(Task):
    """COCO detection. ``task_options["with_text"]`` (default True) pairs each image with a caption.

    Training reads ``coco/`` instances of ``train``; crowd objects are left out of the targets, as in DETR;
    images without objects are kept (their targets are empty). With ``with_text``, images that have no
    caption in ``captions_train`` are skipped and counted as ``no_annotations``. Evaluation pairs each image
    with its first caption and uses an empty text (``[CLS] [SEP]``) for an image without one, so that
    every ground-truth image is scored. COCOeval scores the annotations the reader keeps: those it skips
    and counts (e.g. a malformed ``bbox``) are left out of the ground truth. A preset may change the model's
    configuration for this task (``tiny``: 10 queries, the class weighted 2 in matching and loss, DC5, and
    two-stage queries from a token detection head;
    see :data:`fastvlp.models.presets.FINETUNE_OVERRIDES`) and where the rate drops (``tiny``: after 0.9
    of the run; :data:`fastvlp.models.presets.FINETUNE_LR_DROPS`)."""

    name = "detection"
    loss_keys = ("loss",) + DETECTION_LOSS_KEYS + TOKEN_LOSS_KEYS
    model_class = DetectionModel
    paper_lr = 1e-4
    decay_milestones = (2 / 3,)  # DETR lowers its rate tenfold after two thirds of its schedule
    eval_split = "val"
    default_max_steps = 5000

    def read_training_data(self, data_dir: Path, options: Dict[str, Any]) -> TrainingData:
        with_text = bool(options.get("with_text", True))
        coco_dir = Path(data_dir) / "coco"
        index = ImageIndex([coco_dir]) if coco_dir.is_dir() else None
        result = read_coco_instances(coco_dir, "train", image_index=index)
        records = [dataclasses.replace(r, objects=tuple(o for o in r.objects if not o.iscrowd)) for r in result.records]
        if with_text:
            records = _with_captions(records, _captions_by_image(coco_dir, "train", index))
            for record in records:
                if not record.captions:
                    result.skips.add(NO_ANNOTATIONS, f"no caption for image {record.image_id}")
            records = [r for r in records if r.captions]
        categories = [{"id": c.id, "name": c.name} for c in result.categories]
        return TrainingData(records, result.skips, {"categories": categories, "with_text": with_text})

    def tokenizer_texts(self, records):
        for record in records:
            yield from record.captions
            yield from (obj.name for obj in record.objects)

    def training_dataset(self, records, transform, task_state):
        categories = _check_categories(task_state.get("categories"))
        labels = {c["id"]: index for index, c in enumerate(categories)}
        inner = ImageRecordDataset(records, transform, category_to_label=labels)
        return DetectionSamples(inner, task_state.get("with_text", True))

    def build_batch(self, collated, tokenizer, generator) -> TaskBatch:
        images, pixel_mask = images_and_mask(collated)
        targets = [{"labels": labels, "boxes": boxes} for labels, boxes in zip(collated["labels"], collated["boxes"])]
        batch = TaskBatch(images=images, pixel_mask=pixel_mask, targets=targets)
        if "caption" in collated:
            batch["input_ids"], batch["text_attention_mask"] = encode_texts(tokenizer, collated["caption"])
        return batch

    @torch.inference_mode()
    def evaluate(self, model, tokenizer, data_dir, split, device, batch_size, scale) -> EvaluationResult:
        coco_dir = Path(data_dir) / "coco"
        index = ImageIndex([coco_dir]) if coco_dir.is_dir() else None
        result = read_coco_instances(coco_dir, split, image_index=index)
        records = result.records
        notes: List[str] = []
        if model.with_text:
            records = _with_captions(records, _captions_by_image(coco_dir, split, index))
            uncaptioned = sum(1 for r in records if not r.captions)
            if uncaptioned:
                notes.append(f"{uncaptioned} images have no caption: encoded with an empty text")
        dataset = ImageRecordDataset(records, eval_transform(scale))
        skipped = dict(result.skips.counts)
        predictions: List[Dict[str, Any]] = []
        num_images = 0
        model.eval()
        for collated in readable_samples(dataset, batch_size, skipped):
            images, pixel_mask = images_and_mask(collated)
            input_ids = attention = None
            if model.with_text:
                texts = [captions[0] if captions else "" for captions in collated["captions"]]
                input_ids, attention = (t.to(device) for t in encode_texts(tokenizer, texts))
            outputs = model.detection_outputs(images.to(device), pixel_mask.to(device), input_ids, attention,
                                              aux_outputs=False)
            predictions += detections_to_coco(collated["image_id"], collated["original_size"], outputs.pred_logits,
                                              outputs.pred_boxes, model.category_ids)
            num_images += len(collated["image_id"])
        metrics: Dict[str, Any] = {}
        ground_truth = _evaluation_ground_truth(coco_annotation_file(coco_dir, "instances", split), result.categories)
        left_out = sum(skipped.get(reason, 0) for reason in _SKIPPED_OBJECTS)
        if left_out:
            notes.append(f"{left_out} annotation entries the reader skipped are left out of the ground truth")
        if ground_truth["annotations"]:
            ap = coco_detection_ap(predictions, ground_truth)
            # COCOeval gives -1 for a size class without ground-truth objects: undefined, not a score.
            metrics = {key: None if ap[key] == -1 else float(ap[key]) for key in AP_KEYS}
            empty = [key for key in AP_KEYS if metrics[key] is None]
            if empty:
                notes.append(f"{', '.join(empty)}: undefined (null), the split has no ground-truth objects of that size")
        else:
            notes.append(f"split {split!r} has no ground-truth objects: AP not computed")
        if skipped.get(MISSING_IMAGE, 0) or skipped.get(UNREADABLE_IMAGE, 0):
            notes.append("images that could not be read count as missed by COCOeval")
        return EvaluationResult(self.name, split, num_images, metrics, predictions, skipped, notes)

    @torch.inference_mode()
    def predict(self, model, tokenizer, images, sizes, text: Optional[str], top_k: int) -> Dict[str, Any]:
        if not isinstance(images, Sequence) or not images:
            raise ValueError("images: expected a non-empty list of image tensors [3, H, W]")
        if not isinstance(sizes, Sequence) or len(sizes) < 1 or len(sizes[0]) != 2:
            raise ValueError("sizes: expected the original (H, W) of each image")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text: expected a str or None, got {type(text).__name__}")
        nested = nested_tensor_from_images(images[:1])
        device = next(model.parameters()).device
        input_ids = attention = None
        if model.with_text:
            input_ids, attention = (t.to(device) for t in encode_texts(tokenizer, [text or ""]))
        outputs = model.detection_outputs(nested.tensors.to(device), nested.mask.to(device), input_ids, attention,
                                          aux_outputs=False)
        scores, labels, boxes = postprocess_detections(outputs.pred_logits, outputs.pred_boxes)
        height, width = (float(side) for side in sizes[0])
        pixels = box_cxcywh_to_xyxy(boxes[0].double()) * torch.tensor([width, height, width, height], dtype=torch.float64,
                                                                      device=boxes.device)
        values, order = scores[0].topk(min(top_k, scores.shape[1]))
        detections = []
        for score, query in zip(values.tolist(), order.tolist()):
            label = int(labels[0, query])
            detections.append({"box": [round(v, 2) for v in pixels[query].tolist()], "label": model.category_names[label],
                               "category_id": model.category_ids[label], "score": round(float(score), 6)})
        return {"task": "detection", "text": text if model.with_text else None, "detections": detections}
