"""DETR's set criterion: Hungarian matching, then class, box and (optionally) attribute losses on the
matched pairs, at the last decoder layer and at every auxiliary layer.

Interface as DETR's ``SetCriterion``: ``forward(outputs, targets)`` returns the unweighted losses by name
(auxiliary layer ``i`` with the suffix ``_i``), and ``weight_dict`` says how to sum them
(:meth:`SetCriterion.weighted_total`).

* ``outputs``: ``pred_logits`` ``[B, Q, num_classes + 1]`` (the last class is "no object"),
  ``pred_boxes`` ``[B, Q, 4]`` normalised cxcywh, optionally ``pred_attributes`` ``[B, Q, A]`` and
  ``aux_outputs`` (a list of dicts with the same keys, one per earlier decoder layer).
* ``targets``: one dict per image with ``labels`` ``[N]`` int64, ``boxes`` ``[N, 4]`` normalised cxcywh
  and optionally ``attributes`` ``[N, A]`` (multi-hot, bool or float).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

LOSSES = ("labels", "boxes", "cardinality", "attributes")
ATTRIBUTE_LOSSES = ("softmax", "bce")
Match = Tuple[Tensor, Tensor]


def build_weight_dict(
    class_weight: float = 1.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    attribute_weight: Optional[float] = None,
    num_aux_layers: int = 0,
) -> Dict[str, float]:
    """DETR's ``weight_dict``: ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and ``loss_attr`` when
    ``attribute_weight`` is given), repeated with the suffix ``_i`` for each auxiliary layer."""
    if isinstance(num_aux_layers, bool) or not isinstance(num_aux_layers, int) or num_aux_layers < 0:
        raise ValueError(f"num_aux_layers: expected a non-negative int, got {num_aux_layers!r}")
    weights = {"loss_ce": float(class_weight), "loss_bbox": float(bbox_weight), "loss_giou": float(giou_weight)}
    if attribute_weight is not None:
        weights["loss_attr"] = float(attribute_weight)
    for layer in range(num_aux_layers):
        weights.update({f"{name}_{layer}": value for name, value in list(weights.items()) if name.count("_") == 1})
    return weights


def _world_average(values: Tensor) -> Tensor:
    """Average a small tensor of counts over the distributed group (identity without one)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values


def _check_outputs(outputs: Mapping[str, Tensor], name: str) -> None:
    if not isinstance(outputs, Mapping):
        raise TypeError(f"{name}: expected a dict of tensors, got {type(outputs).__name__}")
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise ValueError(f"{name}: missing {key!r}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"{name}: expected pred_logits [B, Q, C] and pred_boxes [B, Q, 4], got {list(logits.shape)} and {list(boxes.shape)}"
        )


class SetCriterion(nn.Module):
    """DETR's set loss, with an attribute term.

    Args:
        num_classes: object classes, without the no-object class (index ``num_classes``).
        matcher: a module with DETR's matcher interface, e.g. :class:`fastvlp.nn.matcher.HungarianMatcher`.
        weight_dict: loss name -> weight, read by :meth:`weighted_total` (see :func:`build_weight_dict`).
        eos_coef: the weight of the no-object class in the classification cross-entropy (0.1).
        losses: which of ``"labels"`` (``loss_ce``, and ``class_error`` for logging), ``"boxes"``
            (``loss_bbox``: L1; ``loss_giou``: 1 - GIoU; both summed over matched boxes and divided by the
            number of target boxes), ``"cardinality"`` (``cardinality_error``, logging only) and
            ``"attributes"`` (``loss_attr``) to compute.
        attribute_loss: ``"softmax"``: cross-entropy of a softmax over the attributes, averaged over each
            object's attribute labels (bottom-up attention's form of ``-log p(a)``); ``"bce"``: per-attribute
            binary cross-entropy, summed over attributes. Either way only matched objects that carry at
            least one attribute count, and the sum is divided by the number of such target objects.
        match_layers_together: solve the matching of all decoder layers in one matcher call (the layers'
            problems are independent, so the matches are the ones separate calls give; a batched solver
            then runs once instead of once per layer).

    Box and attribute normalisers are averaged over the distributed group when one is initialised, as in
    DETR, so every process must call the criterion.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Mapping[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "boxes", "cardinality"),
        *,
        attribute_loss: str = "softmax",
        match_layers_together: bool = True,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if not callable(matcher):
            raise TypeError(f"matcher: expected a callable matcher module, got {type(matcher).__name__}")
        if not isinstance(weight_dict, Mapping):
            raise TypeError(f"weight_dict: expected a mapping, got {type(weight_dict).__name__}")
        if not 0.0 <= eos_coef:
            raise ValueError(f"eos_coef: expected a non-negative weight, got {eos_coef!r}")
        unknown = [loss for loss in losses if loss not in LOSSES]
        if unknown or isinstance(losses, str):
            raise ValueError(f"losses: expected a sequence drawn from {LOSSES}, got {losses!r}")
        if attribute_loss not in ATTRIBUTE_LOSSES:
            raise ValueError(f"attribute_loss: expected one of {ATTRIBUTE_LOSSES}, got {attribute_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = tuple(losses)
        self.attribute_loss = attribute_loss
        self.match_layers_together = bool(match_layers_together)
        self._class_weights: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}
        self.last_match_device: Optional[torch.device] = None

    def class_weights(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[num_classes + 1]`` cross-entropy weights, 1 except ``eos_coef`` for no-object, built in
        ``dtype`` (a float32 0.1 cast to float64 would not be 0.1) and cached per dtype and device."""
        key = (dtype, device)
        if key not in self._class_weights:
            weights = torch.ones(self.num_classes + 1, dtype=dtype)
            weights[-1] = self.eos_coef
            self._class_weights[key] = weights.to(device)
        return self._class_weights[key]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, attribute_loss={self.attribute_loss!r}"

    # ------------------------------------------------------------------ matching

    def match(self, layers: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> List[List[Match]]:
        """Matches for each layer's outputs: ``[layer][image] -> (prediction indices, target indices)``."""
        self.last_match_device = layers[0]["pred_logits"].device
        same_queries = len({tuple(layer["pred_logits"].shape) for layer in layers}) == 1
        if not (self.match_layers_together and same_queries and len(layers) > 1):
            return [self.matcher({k: layer[k] for k in ("pred_logits", "pred_boxes")}, targets) for layer in layers]
        stacked = {key: torch.cat([layer[key].detach() for layer in layers]) for key in ("pred_logits", "pred_boxes")}
        matches = self.matcher(stacked, list(targets) * len(layers))
        batch = len(targets)
        return [matches[index * batch : (index + 1) * batch] for index in range(len(layers))]

    # ------------------------------------------------------------------ losses

    @staticmethod
    def _prediction_index(matches: Sequence[Match]) -> Tuple[Tensor, Tensor]:
        batch_index = torch.cat([torch.full_like(source, image) for image, (source, _) in enumerate(matches)])
        query_index = torch.cat([source for source, _ in matches])
        return batch_index, query_index

    def loss_labels(self, outputs, targets, matches, counts, log: bool = True) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits: expected {self.num_classes + 1} classes (with no-object), got {logits.shape[-1]}")
        index = self._prediction_index(matches)
        matched_labels = torch.cat([target["labels"][target_index] for target, (_, target_index) in zip(targets, matches)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[index] = matched_labels.to(logits.device)
        # cross_entropy computes half-precision logits in float32 (also under autocast).
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss = F.cross_entropy(logits.transpose(1, 2).to(compute_dtype), target_classes, self.class_weights(compute_dtype, logits.device))
        losses = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                matched_logits = logits[index]
                if matched_logits.shape[0]:
                    accuracy = (matched_logits.argmax(-1) == matched_labels.to(logits.device)).float().mean() * 100
                else:
                    accuracy = logits.new_zeros(())
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, matches, counts, log: bool = True) -> Dict[str, Tensor]:
        """The L1 error of the number of predicted (not no-object) boxes: logging only, no gradient."""
        logits = outputs["pred_logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        expected = torch.as_tensor([len(target["labels"]) for target in targets], dtype=torch.float32, device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, expected)}

    def loss_boxes(self, outputs, targets, matches, counts, log: bool = True) -> Dict[str, Tensor]:
        index = self._prediction_index(matches)
        predicted = outputs["pred_boxes"][index]
        target_boxes = torch.cat([target["boxes"][target_index] for target, (_, target_index) in zip(targets, matches)])
        target_boxes = target_boxes.to(predicted)
        num_boxes = counts[0]
        loss_bbox = F.l1_loss(predicted, target_boxes, reduction="none").sum() / num_boxes
        # Pairwise GIoU of each matched pair: [N, 1, 4] x [N, 1, 4] -> [N, 1, 1].
        giou = generalized_box_iou(
            box_cxcywh_to_xyxy(predicted)[:, None],
            box_cxcywh_to_xyxy(target_boxes)[:, None],
            check_degenerate=predicted.device.type == "cpu",  # the check reads data: a host sync on CUDA
        )
        loss_giou = (1 - giou.flatten()).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_attributes(self, outputs, targets, matches, counts, log: bool = True) -> Dict[str, Tensor]:
        if "pred_attributes" not in outputs:
            raise ValueError("outputs: the 'attributes' loss needs 'pred_attributes'")
        logits = outputs["pred_attributes"]
        index = self._prediction_index(matches)
        matched_logits = logits[index]
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        wanted = []
        for target, (_, target_index) in zip(targets, matches):
            attributes = target.get("attributes")
            if attributes is None:
                attributes = logits.new_zeros((len(target["labels"]), logits.shape[-1]))
            elif attributes.dim() != 2 or attributes.shape[1] != logits.shape[-1]:
                raise ValueError(f"targets: 'attributes' must be [N, {logits.shape[-1]}], got {list(attributes.shape)}")
            wanted.append(attributes[target_index].to(device=logits.device, dtype=compute_dtype))
        wanted = torch.cat(wanted) if wanted else logits.new_zeros((0, logits.shape[-1]), dtype=compute_dtype)
        labelled = wanted.sum(1)
        keep = (labelled > 0).to(compute_dtype)  # objects without attributes contribute 0
        log_input = matched_logits.to(compute_dtype)
        if self.attribute_loss == "softmax":
            distribution = wanted / labelled.clamp(min=1)[:, None]
            per_object = -(distribution * F.log_softmax(log_input, dim=-1)).sum(-1)
        else:
            per_object = F.binary_cross_entropy_with_logits(log_input, wanted, reduction="none").sum(-1)
        return {"loss_attr": (per_object * keep).sum() / counts[1]}

    _LOSS_FUNCTIONS = {
        "labels": "loss_labels",
        "cardinality": "loss_cardinality",
        "boxes": "loss_boxes",
        "attributes": "loss_attributes",
    }

    def _counts(self, targets, device) -> Tensor:
        """[number of target boxes, number of target objects with attributes], averaged over the
        distributed group and at least 1 (DETR's normaliser), without a host sync."""
        num_boxes = sum(len(target["labels"]) for target in targets)
        counts = torch.tensor([float(num_boxes), 0.0], device=device)
        if "attributes" in self.losses:
            with_attributes = [
                target["attributes"].to(device).bool().any(1).sum() for target in targets if target.get("attributes") is not None
            ]
            if with_attributes:
                counts[1] = torch.stack(with_attributes).sum().to(counts.dtype)
        return _world_average(counts).clamp(min=1)

    def join_counts_without_targets(self, device) -> None:
        """What a distributed process with nothing to match this step calls instead of the criterion: it
        takes part in the box-count average the other processes' criterion calls make (with zero boxes),
        so every process runs the same collectives in the same order. Without a group it does nothing."""
        _world_average(torch.zeros(2, device=device))

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
        _check_outputs(outputs, "outputs")
        if isinstance(targets, Mapping) or len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"targets: expected a list of {outputs['pred_logits'].shape[0]} dicts (one per image)")
        for image, target in enumerate(targets):
            if not isinstance(target, Mapping) or "labels" not in target or "boxes" not in target:
                raise ValueError(f"targets[{image}]: expected a dict with 'labels' and 'boxes'")
        auxiliary = list(outputs.get("aux_outputs", ()))
        for index, aux in enumerate(auxiliary):
            _check_outputs(aux, f"outputs['aux_outputs'][{index}]")
        layers = [outputs] + auxiliary
        matches = self.match(layers, targets)
        counts = self._counts(targets, outputs["pred_logits"].device)

        losses: Dict[str, Tensor] = {}
        for layer_index, (layer, layer_matches) in enumerate(zip(layers, matches)):
            suffix = "" if layer_index == 0 else f"_{layer_index - 1}"
            for loss in self.losses:
                # Logging-only values (class_error) are reported for the last layer only, as in DETR.
                values = getattr(self, self._LOSS_FUNCTIONS[loss])(layer, targets, layer_matches, counts, log=layer_index == 0)
                losses.update({name + suffix: value for name, value in values.items()})
        return losses

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum(weight_dict[name] * losses[name])`` over the names in both."""
        names = [name for name in losses if name in self.weight_dict]
        if not names:
            raise ValueError("losses: none of them has a weight in weight_dict")
        return sum(losses[name] * self.weight_dict[name] for name in names)
