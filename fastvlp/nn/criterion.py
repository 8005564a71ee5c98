"""DETR's set criterion: Hungarian matching, then class, box and (optionally) attribute losses on the
matched pairs, at the last decoder layer and at every auxiliary layer.

Interface as DETR's ``SetCriterion``: ``forward(outputs, targets)`` returns the unweighted losses by name
(auxiliary layer ``i`` with the suffix ``_i``), and ``weight_dict`` says how to sum them
(:meth:`SetCriterion.weighted_total`).

* ``outputs``: ``pred_logits`` ``[B, Q, num_classes + 1]`` (the last class is "no object"),
  ``pred_boxes`` ``[B, Q, 4]`` normalised cxcywh, optionally ``pred_attributes`` ``[B, Q, A]`` and
  ``aux_outputs`` (a list of dicts with the same keys, one per earlier decoder layer).
* ``targets``: one dict per image with ``labels`` ``[N]`` (any integer dtype, classes in
  ``[0, num_classes)``), ``boxes`` ``[N, 4]`` normalised cxcywh and optionally ``attributes`` ``[N, A]``
  (multi-hot, bool or float), on any device: they are moved to the predictions' device once.

With fastvlp's batched solver as the matcher, the matches come as one dense ``[B, Q]`` assignment and the
matched pairs of the whole batch are gathered at once (:mod:`fastvlp.nn.matched_pairs`), in a number of
operations that does not depend on the batch size; with any other matcher (scipy's, DETR's own) they are
gathered image by image from the per-image index lists, as DETR does. Both give the same losses. Either way,
decoder layers whose outputs have one shape (the usual case) are stacked along the batch, so that each loss
runs once for all of them rather than once a layer.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.nn.matched_pairs import (Match, MatchedPairs, PaddedTargets, pad_set_targets, pairs_from_assignment,
                                      pairs_from_matches, repeat_targets)
from fastvlp.ops.boxes import box_cxcywh_to_xyxy, check_box_order, generalized_box_iou
from fastvlp.ops.matching_cost import check_target_labels

LOSSES = ("labels", "boxes", "cardinality", "attributes")
ATTRIBUTE_LOSSES = ("softmax", "bce")


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


def _check_padded_targets(padded: PaddedTargets, batch: int, dense: bool) -> None:
    """Raise naming what is wrong with padded targets handed to the criterion (their values are not read: on CUDA
    that would be a host sync)."""
    if not dense:
        raise ValueError("targets: padded targets need the batched solver (HungarianMatcher(backend='fastvlp')); "
                         "give DETR's per-image dicts to any other matcher")
    length = padded.labels.shape[1] if padded.labels.dim() == 2 else -1
    if padded.labels.shape != (batch, length) or padded.labels.dtype != torch.int64:
        raise ValueError(f"targets.labels: expected int64 [{batch}, T], got {padded.labels.dtype} {list(padded.labels.shape)}")
    if padded.boxes.shape != (batch, length, 4):
        raise ValueError(f"targets.boxes: expected [{batch}, {length}, 4], got {list(padded.boxes.shape)}")
    if padded.counts.shape != (batch,) or padded.counts.dtype != torch.int64:
        raise ValueError(f"targets.counts: expected int64 [{batch}], got {padded.counts.dtype} {list(padded.counts.shape)}")
    if padded.attributes is not None and padded.attributes.shape[:2] != (batch, length):
        raise ValueError(f"targets.attributes: expected [{batch}, {length}, A], got {list(padded.attributes.shape)}")


def _padded_for_losses(padded: PaddedTargets, device: torch.device, num_attributes: Optional[int],
                       attribute_dtype: torch.dtype) -> PaddedTargets:
    """``padded`` on ``device`` with its attributes as the attribute loss reads them (zeros where it has none)."""
    padded = padded.to(device)
    if num_attributes is None:
        return PaddedTargets(padded.labels, padded.boxes, padded.counts, padded.sizes)
    attributes = padded.attributes
    if attributes is None:
        attributes = padded.boxes.new_zeros((*padded.labels.shape, num_attributes), dtype=attribute_dtype)
    elif attributes.shape[-1] != num_attributes:
        raise ValueError(f"targets.attributes: expected {num_attributes} attributes, got {attributes.shape[-1]}")
    return PaddedTargets(padded.labels, padded.boxes, padded.counts, padded.sizes, attributes.to(attribute_dtype))


class SetCriterion(nn.Module):
    """DETR's set loss, with an attribute term.

    Args:
        num_classes: object classes, without the no-object class (index ``num_classes``).
        matcher: a module with DETR's matcher interface, e.g. :class:`fastvlp.nn.matcher.HungarianMatcher`.
        weight_dict: loss name -> weight, read by :meth:`weighted_total` (see :func:`build_weight_dict`).
        eos_coef: the weight of the no-object class in the classification cross-entropy (0.1). It may be
            changed between calls; ``empty_weight`` (DETR's buffer of all class weights, not saved in the
            ``state_dict``) follows it. Change the weight through ``eos_coef``, not by writing the buffer.
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

    Labels are validated (integer dtype; on the CPU also the class range, naming the image: on CUDA that
    would be a host sync). An empty batch gives zero losses that still backpropagate. Predicted boxes with
    NaN or infinite coordinates give non-finite box losses on every device, not an error, when they are
    matched; those of unmatched predictions (and the attribute logits of objects that do not count) reach
    neither the losses nor the gradients.
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
        unknown = [loss for loss in losses if loss not in LOSSES]
        if unknown or isinstance(losses, str):
            raise ValueError(f"losses: expected a sequence drawn from {LOSSES}, got {losses!r}")
        if attribute_loss not in ATTRIBUTE_LOSSES:
            raise ValueError(f"attribute_loss: expected one of {ATTRIBUTE_LOSSES}, got {attribute_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        # Not persistent: model checkpoints saved without it must keep loading strictly.
        self.register_buffer("empty_weight", torch.ones(num_classes + 1), persistent=False)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.attribute_loss = attribute_loss
        self.match_layers_together = bool(match_layers_together)
        self._class_weights: Dict[Tuple[torch.dtype, torch.device], Tuple[float, Tensor]] = {}
        self.last_match_device: Optional[torch.device] = None

    @property
    def eos_coef(self) -> float:
        return self._eos_coef

    @eos_coef.setter
    def eos_coef(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < math.inf:
            raise ValueError(f"eos_coef: expected a non-negative finite weight, got {value!r}")
        self._eos_coef = float(value)
        with torch.no_grad():
            self.empty_weight[-1] = self._eos_coef  # a fill on the buffer's device, no host sync

    def class_weights(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[num_classes + 1]`` cross-entropy weights, 1 except ``eos_coef`` for no-object, built in
        ``dtype`` from the Python value (a float32 0.1 cast to float64 would not be 0.1), cached per dtype
        and device and rebuilt when ``eos_coef`` changes."""
        key = (dtype, device)
        cached = self._class_weights.get(key)
        if cached is None or cached[0] != self._eos_coef:
            weights = torch.ones(self.num_classes + 1, dtype=dtype)
            weights[-1] = self._eos_coef
            cached = self._class_weights[key] = (self._eos_coef, weights.to(device))
        return cached[1]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, attribute_loss={self.attribute_loss!r}"

    # ------------------------------------------------------------------ matching

    def match(self, stacked: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]],
              num_layers: int = 1) -> List[Match]:
        """DETR's per-image matches of ``num_layers`` layers' outputs stacked along the batch: ``L * B`` pairs of
        (prediction indices, target indices), layer by layer. One matcher call for all layers, or one a layer
        without ``match_layers_together``."""
        self.last_match_device = stacked["pred_logits"].device
        outputs = {key: stacked[key] for key in ("pred_logits", "pred_boxes")}
        if self.match_layers_together or num_layers == 1:
            return self.matcher(outputs, list(targets) * num_layers)
        batch = len(targets)
        return [match for index in range(num_layers)
                for match in self.matcher({key: value[index * batch : (index + 1) * batch]
                                           for key, value in outputs.items()}, targets)]

    # ------------------------------------------------------------------ losses
    # Each loss reads the outputs of L decoder layers stacked along the batch ([L * B, Q, ...], the last layer
    # first) and their MatchedPairs (fastvlp.nn.matched_pairs), whichever form the matches came in, and gives
    # one value per layer ([L]); a logging value of the last layer alone is a scalar.

    def loss_labels(self, outputs, pairs: MatchedPairs, counts, log: bool = True) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits: expected {self.num_classes + 1} classes (with no-object), got {logits.shape[-1]}")
        target_classes = pairs.target_classes
        layers = pairs.num_layers
        # cross_entropy computes half-precision logits in float32 (also under autocast).
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if target_classes.numel():
            weights = self.class_weights(compute_dtype, logits.device)
            weighted = F.cross_entropy(logits.transpose(1, 2).to(compute_dtype), target_classes, weights, reduction="none")
            # Each layer's weighted mean, as cross_entropy's own reduction takes it.
            loss = weighted.reshape(layers, -1).sum(1) / weights[target_classes].reshape(layers, -1).sum(1)
        else:  # no prediction at all: the weighted mean would be 0 / 0
            loss = logits.sum().to(compute_dtype) * 0 + logits.new_zeros(layers, dtype=compute_dtype)
        losses = {"loss_ce": loss}
        if log:
            with torch.no_grad():  # the last layer's matched predictions (its rows come first)
                batch = logits.shape[0] // layers
                classes = target_classes[:batch]
                matched = classes != self.num_classes
                correct = (logits[:batch].argmax(-1) == classes) & matched
                losses["class_error"] = 100 - correct.sum().float() / matched.sum().clamp(min=1) * 100
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, pairs: MatchedPairs, counts, log: bool = True) -> Dict[str, Tensor]:
        """The L1 error of the number of predicted (not no-object) boxes: logging only, no gradient."""
        logits = outputs["pred_logits"]
        if logits.shape[0] == 0:  # an empty batch: the mean would average nothing to NaN
            return {"cardinality_error": logits.new_zeros(pairs.num_layers, dtype=torch.float32)}
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        errors = (predicted - pairs.num_targets.to(torch.float32)).abs()
        return {"cardinality_error": errors.reshape(pairs.num_layers, -1).mean(1)}

    def loss_boxes(self, outputs, pairs: MatchedPairs, counts, log: bool = True) -> Dict[str, Tensor]:
        predicted = pairs.select(outputs["pred_boxes"])
        target_boxes = pairs.target_boxes.to(predicted)
        if pairs.valid is not None:
            # An unmatched prediction takes its filler target's box: it adds exactly 0, and no NaN it may hold
            # reaches the loss or the gradient.
            predicted = torch.where(pairs.valid[:, None], predicted, target_boxes)
        num_boxes = counts[0]
        l1 = F.l1_loss(predicted, target_boxes, reduction="none").sum(1)
        predicted_xyxy, target_xyxy = box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(target_boxes)
        if predicted.device.type == "cpu":  # the check reads data: a host sync on CUDA
            # Non-finite boxes pass as on CUDA: the loss becomes NaN, which a training loop can skip.
            check_box_order("outputs['pred_boxes'] (matched)", predicted_xyxy, skip_non_finite=True)
            check_box_order("targets' boxes (matched)", target_xyxy, skip_non_finite=True)
        # Pairwise GIoU of each matched pair: [N, 1, 4] x [N, 1, 4] -> [N, 1, 1].
        giou_loss = 1 - generalized_box_iou(predicted_xyxy[:, None], target_xyxy[:, None], check_degenerate=False).flatten()
        if pairs.valid is not None:
            giou_loss = torch.where(pairs.valid, giou_loss, 0)
        return {"loss_bbox": pairs.per_layer(l1) / num_boxes, "loss_giou": pairs.per_layer(giou_loss) / num_boxes}

    def loss_attributes(self, outputs, pairs: MatchedPairs, counts, log: bool = True) -> Dict[str, Tensor]:
        if "pred_attributes" not in outputs:
            raise ValueError("outputs: the 'attributes' loss needs 'pred_attributes'")
        wanted = pairs.target_attributes
        labelled = wanted.sum(1)
        keep = labelled > 0  # objects without attributes (and unmatched predictions) contribute 0
        # Their logits are replaced by 0 so that no NaN they may hold reaches the loss or the gradient.
        log_input = torch.where(keep[:, None], pairs.select(outputs["pred_attributes"]).to(wanted.dtype), 0)
        if self.attribute_loss == "softmax":
            distribution = wanted / labelled.clamp(min=1)[:, None]
            per_object = -(distribution * F.log_softmax(log_input, dim=-1)).sum(-1)
        else:
            per_object = F.binary_cross_entropy_with_logits(log_input, wanted, reduction="none").sum(-1)
        return {"loss_attr": pairs.per_layer(torch.where(keep, per_object, 0)) / counts[1]}

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

    @staticmethod
    def _targets_on(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> List[Dict[str, Tensor]]:
        """The targets with ``labels`` (as int64), ``boxes`` and ``attributes`` on ``device``: the matches
        come back on the predictions' device and index them there. A no-op copy for tensors already there."""
        moved = []
        for target in targets:
            target = dict(target)
            target["labels"] = target["labels"].to(device, torch.int64)
            for key in ("boxes", "attributes"):
                if isinstance(target.get(key), Tensor):
                    target[key] = target[key].to(device)
            moved.append(target)
        return moved

    def _assigns_densely(self) -> bool:
        """Whether the matcher gives the whole batch's matches as one dense assignment (the batched solver's
        :meth:`~fastvlp.nn.HungarianMatcher.assign`), so that the pairs are gathered for every image at once.
        Any other matcher's per-image matches are gathered image by image, as DETR does."""
        return getattr(self.matcher, "backend", None) == "fastvlp" and callable(getattr(self.matcher, "assign", None))

    def assign(self, stacked: Mapping[str, Tensor], padded: PaddedTargets, num_layers: int = 1) -> Tensor:
        """The ``[L * B, Q]`` assignment (see :meth:`_assigns_densely`) of ``num_layers`` layers' outputs stacked
        along the batch, on ``padded`` targets of as many rows (:func:`~fastvlp.nn.matched_pairs.repeat_targets`).
        One solver call for all layers, or one a layer without ``match_layers_together``."""
        logits, boxes = stacked["pred_logits"], stacked["pred_boxes"]
        self.last_match_device = logits.device
        if self.match_layers_together or num_layers == 1:
            return self.matcher.assign(logits, boxes, padded.labels, padded.boxes, padded.counts)
        batch = logits.shape[0] // num_layers
        rows = [slice(index * batch, (index + 1) * batch) for index in range(num_layers)]
        return torch.cat([self.matcher.assign(logits[row], boxes[row], padded.labels[row], padded.boxes[row],
                                              padded.counts[row]) for row in rows])

    def _padded_counts(self, padded: PaddedTargets) -> Tensor:
        """:meth:`_counts` from padded targets (padding rows carry no attributes), computed on the device from
        the device's counts: nothing is copied from the host, so a CUDA graph can replay it."""
        num_boxes = padded.counts.sum().to(torch.float32)
        with_attributes = (padded.attributes.ne(0).any(-1).sum().to(torch.float32) if padded.attributes is not None
                           else torch.zeros_like(num_boxes))
        return _world_average(torch.stack((num_boxes, with_attributes))).clamp(min=1)

    def _attribute_layout(self, outputs: Mapping[str, Tensor]) -> Tuple[Optional[int], torch.dtype]:
        """(number of attributes, dtype the attribute loss computes in), or (None, float32) without that loss."""
        if "attributes" not in self.losses:
            return None, torch.float32
        if "pred_attributes" not in outputs:
            raise ValueError("outputs: the 'attributes' loss needs 'pred_attributes'")
        logits = outputs["pred_attributes"]
        return logits.shape[-1], torch.float64 if logits.dtype == torch.float64 else torch.float32

    def forward(self, outputs: Mapping, targets: Union[Sequence[Mapping[str, Tensor]], PaddedTargets]) -> Dict[str, Tensor]:
        """The losses of ``outputs`` (and their ``aux_outputs``) against ``targets``: DETR's per-image dicts, or,
        with the batched solver, targets already padded (:class:`PaddedTargets`, e.g. to a fixed length by
        :func:`fastvlp.models.with_static_targets`; their labels are trusted to lie in ``[0, num_classes)``)."""
        _check_outputs(outputs, "outputs")
        if isinstance(targets, PaddedTargets):
            _check_padded_targets(targets, outputs["pred_logits"].shape[0], self._assigns_densely())
        elif isinstance(targets, Mapping) or len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"targets: expected a list of {outputs['pred_logits'].shape[0]} dicts (one per image)")
        else:
            for image, target in enumerate(targets):
                if not isinstance(target, Mapping) or "labels" not in target or "boxes" not in target:
                    raise ValueError(f"targets[{image}]: expected a dict with 'labels' and 'boxes'")
            check_target_labels([target["labels"] for target in targets], self.num_classes,
                                f" (num_classes={self.num_classes}; {self.num_classes} is the no-object class)")
        auxiliary = list(outputs.get("aux_outputs", ()))
        for index, aux in enumerate(auxiliary):
            _check_outputs(aux, f"outputs['aux_outputs'][{index}]")
        layers = [outputs] + auxiliary
        device = outputs["pred_logits"].device
        num_attributes, attribute_dtype = self._attribute_layout(outputs)
        dense = self._assigns_densely()
        if isinstance(targets, PaddedTargets):
            padded = _padded_for_losses(targets, device, num_attributes, attribute_dtype)
            counts = self._padded_counts(padded)
        elif dense:
            padded = pad_set_targets(targets, device, num_attributes, attribute_dtype)
            counts = self._padded_counts(padded)
        else:
            targets = self._targets_on(targets, device)
            counts = self._counts(targets, device)

        # Layers of one shape are stacked along the batch, so that the matching and each loss run once for all.
        keys = ("pred_logits", "pred_boxes") + (("pred_attributes",) if num_attributes is not None else ())
        same_shape = len({tuple(tuple(layer[key].shape) for key in keys if key in layer) for layer in layers}) == 1
        groups = [list(range(len(layers)))] if same_shape else [[index] for index in range(len(layers))]
        by_layer: List[Dict[str, Tensor]] = [{} for _ in layers]
        for group in groups:
            if len(group) == 1:
                stacked = layers[group[0]]
            else:
                stacked = {key: torch.cat([layers[index][key] for index in group]) for key in keys if key in layers[0]}
            if dense:
                repeated = repeat_targets(padded, len(group))
                pairs = pairs_from_assignment(self.assign(stacked, repeated, len(group)), repeated, self.num_classes,
                                              len(group))
            else:
                pairs = pairs_from_matches(self.match(stacked, targets, len(group)), targets, self.num_classes,
                                           tuple(stacked["pred_logits"].shape[:2]), device, num_attributes,
                                           attribute_dtype, len(group))
            for loss in self.losses:
                # Logging-only values (class_error) are reported for the last layer only, as in DETR.
                values = getattr(self, self._LOSS_FUNCTIONS[loss])(stacked, pairs, counts, log=group[0] == 0)
                for name, value in values.items():
                    if value.dim() == 0:
                        by_layer[0][name] = value
                    else:
                        for index, layer_value in zip(group, value.unbind(0)):
                            by_layer[index][name] = layer_value
        losses: Dict[str, Tensor] = {}
        for index, layer_losses in enumerate(by_layer):
            suffix = "" if index == 0 else f"_{index - 1}"
            losses.update({name + suffix: value for name, value in layer_losses.items()})
        return losses

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum(weight_dict[name] * losses[name])`` over the names in both."""
        names = [name for name in losses if name in self.weight_dict]
        if not names:
            raise ValueError("losses: none of them has a weight in weight_dict")
        return sum(losses[name] * self.weight_dict[name] for name in names)
