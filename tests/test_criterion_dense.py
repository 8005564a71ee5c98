"""The set criterion's two ways of gathering matched pairs: one dense assignment for the whole batch (the
batched solver) and DETR's per-image lists (any other matcher). Same losses and gradients; the dense way in a
number of operations that does not grow with the batch; neither lets an unmatched prediction's NaN through."""
import collections

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from fastvlp.nn.matched_pairs import pad_set_targets, pairs_from_assignment, pairs_from_matches
from fastvlp.nn.matcher import HungarianMatcher
from fastvlp.ops.ragged import pad_ragged, ragged_index
from test_criterion import COSTS, NUM_ATTRIBUTES, NUM_CLASSES, make_criterion, make_outputs, random_targets


class PerImageMatcher(torch.nn.Module):
    """The batched solver behind DETR's interface only (no ``assign``): the criterion gathers per image."""

    def __init__(self):
        super().__init__()
        self.inner = HungarianMatcher(*COSTS)
        self.backend = "fastvlp"

    def forward(self, outputs, targets):
        return self.inner(outputs, targets)


def _criteria(**kwargs):
    dense = make_criterion("fastvlp", **kwargs)
    per_image = make_criterion("fastvlp", **kwargs)
    per_image.matcher = PerImageMatcher()
    assert dense._assigns_densely() and not per_image._assigns_densely()
    return dense, per_image


@pytest.mark.parametrize("attribute_loss", ["softmax", "bce"])
@pytest.mark.parametrize("counts", [[0, 3, 7, 2], [1, 1, 1], [0, 0]])
def test_dense_and_per_image_pairs_give_the_same_losses_and_gradients(attribute_loss, counts):
    generator = torch.Generator().manual_seed(31)
    targets = random_targets(counts, generator)  # 7 targets: more than the 6 queries
    outputs, layers = make_outputs(3, len(counts), 6, generator)
    dense, per_image = _criteria(attribute_loss=attribute_loss)
    expected = per_image(outputs, targets)
    losses = dense(outputs, targets)
    assert losses.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    tensors = [t for layer in layers for t in layer.values()]
    grads = torch.autograd.grad(dense.weighted_total(losses), tensors, allow_unused=True)
    expected_grads = torch.autograd.grad(per_image.weighted_total(expected), tensors, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dense", [True, False])
def test_unmatched_predictions_pass_no_nan(dense):
    """NaN in the boxes and attribute logits of predictions that match nothing (matched on clean outputs):
    the box and attribute losses and their gradients stay those of the matched pairs, in both ways of
    gathering."""
    generator = torch.Generator().manual_seed(37)
    targets = random_targets([2, 1], generator)
    outputs, _ = make_outputs(1, 2, 6, generator)
    criterion = _criteria(num_aux=0)[0 if dense else 1]
    device = torch.device("cpu")
    padded = pad_set_targets(targets, device, NUM_ATTRIBUTES, torch.float64)
    matches = criterion.matcher(outputs, targets)
    if dense:
        pairs = pairs_from_assignment(criterion.assign(outputs, padded), padded, NUM_CLASSES)
        counts = criterion._padded_counts(padded)
    else:
        pairs = pairs_from_matches(matches, targets, NUM_CLASSES, (2, 6), device, NUM_ATTRIBUTES, torch.float64)
        counts = criterion._counts(targets, device)
    poisoned = {key: outputs[key].detach().clone() for key in ("pred_boxes", "pred_attributes")}
    for image, (rows, _) in enumerate(matches):
        unmatched = [query for query in range(6) if query not in rows.tolist()]
        poisoned["pred_boxes"][image, unmatched] = float("nan")
        poisoned["pred_attributes"][image, unmatched] = float("nan")
    poisoned = {key: value.requires_grad_() for key, value in poisoned.items()}
    for loss, names in (("loss_boxes", ("loss_bbox", "loss_giou")), ("loss_attributes", ("loss_attr",))):
        clean = getattr(criterion, loss)(outputs, pairs, counts)
        values = getattr(criterion, loss)(poisoned, pairs, counts)
        for name in names:
            torch.testing.assert_close(values[name], clean[name], rtol=1e-12, atol=1e-12, msg=name)
        sum(values.values()).backward()
    for key in ("pred_boxes", "pred_attributes"):
        assert torch.isfinite(poisoned[key].grad).all(), key


def test_nan_in_a_matched_box_still_gives_a_nan_loss():
    generator = torch.Generator().manual_seed(41)
    targets = random_targets([2, 3], generator)
    outputs, _ = make_outputs(1, 2, 5, generator)
    criterion = _criteria(num_aux=0)[0]
    padded = pad_set_targets(targets, torch.device("cpu"))
    pairs = pairs_from_assignment(criterion.assign(outputs, padded), padded, NUM_CLASSES)
    rows, _ = criterion.matcher(outputs, targets)[1]
    boxes = outputs["pred_boxes"].detach().clone()
    boxes[1, rows[0]] = float("nan")
    losses = criterion.loss_boxes(dict(outputs, pred_boxes=boxes), pairs, criterion._padded_counts(padded))
    assert torch.isnan(losses["loss_bbox"]) and torch.isnan(losses["loss_giou"])


class CountOperations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _operations(criterion, batch, layers=3):
    generator = torch.Generator().manual_seed(43)
    targets = random_targets([3 + image % 4 for image in range(batch)], generator)
    outputs, _ = make_outputs(layers, batch, 8, generator)
    criterion(outputs, targets)  # builds and caches the class weights, once per criterion
    with CountOperations() as counter:
        criterion(outputs, targets)
    return counter.count


def test_dense_gathering_takes_a_fixed_number_of_operations():
    dense, per_image = _criteria()
    assert _operations(dense, 4) == _operations(dense, 32)
    # DETR's way grows with the batch: several operations per image and layer.
    assert _operations(per_image, 32) > _operations(per_image, 4) + 28 * 3


def test_each_loss_runs_once_for_all_decoder_layers():
    """Layers are stacked along the batch: a layer more costs only its share of stacking and splitting (a
    few views), not another run of every loss."""
    dense = make_criterion("fastvlp", num_aux=5)
    fewer = make_criterion("fastvlp", num_aux=1)
    assert _operations(dense, 4, layers=6) - _operations(fewer, 4, layers=2) <= 4 * 4


def test_assign_needs_the_batched_solver_and_gives_placeholders_for_failed_problems():
    generator = torch.Generator().manual_seed(47)
    targets = random_targets([2, 4, 0], generator)
    outputs, _ = make_outputs(1, 3, 5, generator)
    logits = outputs["pred_logits"].detach().clone()
    logits[1, 0, 0] = float("nan")  # image 1's cost has a NaN: the solver rejects that problem
    padded = pad_set_targets(targets, torch.device("cpu"))
    matcher = HungarianMatcher(*COSTS, check_finite=False)
    assignment = matcher.assign(logits, outputs["pred_boxes"], padded.labels, padded.boxes, padded.counts)
    assert assignment[1].tolist() == [0, 1, 2, 3, -1]  # prediction i takes target i
    assert assignment[2].tolist() == [-1] * 5  # no target
    assert sorted(assignment[0][assignment[0] >= 0].tolist()) == [0, 1]
    # The per-image form is the same matches.
    for image, (rows, cols) in enumerate(matcher(dict(outputs, pred_logits=logits), targets)):
        assert assignment[image, rows].tolist() == cols.tolist()
        assert (assignment[image] >= 0).sum() == len(rows)
    with pytest.raises(ValueError, match="assign: needs backend='fastvlp'"):
        HungarianMatcher(*COSTS, backend="scipy").assign(logits, outputs["pred_boxes"], padded.labels, padded.boxes,
                                                          padded.counts)


def test_padded_targets_keep_every_row_and_count_attributes():
    generator = torch.Generator().manual_seed(53)
    targets = random_targets([3, 0, 5, 1], generator)  # image 1 has no attribute annotations
    padded = pad_set_targets(targets, torch.device("cpu"), NUM_ATTRIBUTES, torch.float64)
    assert padded.sizes == [3, 0, 5, 1] and padded.counts.tolist() == [3, 0, 5, 1]
    assert padded.attributes.shape == (4, 5, NUM_ATTRIBUTES) and padded.attributes.dtype == torch.float64
    for image, target in enumerate(targets):
        size = len(target["labels"])
        assert torch.equal(padded.labels[image, :size], target["labels"])
        assert torch.equal(padded.boxes[image, :size], target["boxes"])
        assert (padded.boxes[image, size:] == 0.5).all() and (padded.labels[image, size:] == 0).all()
        if "attributes" in target:
            assert torch.equal(padded.attributes[image, :size], target["attributes"].double())
        assert (padded.attributes[image, size:] == 0).all()
    with pytest.raises(ValueError, match=r"'attributes' must be \[N, 4\]"):
        bad = [dict(targets[0], attributes=torch.zeros(3, 2, dtype=torch.bool))]
        pad_set_targets(bad, torch.device("cpu"), NUM_ATTRIBUTES)


@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [0, 0], [1], []])
def test_pad_ragged_equals_padding_image_by_image(sizes):
    generator = torch.Generator().manual_seed(59)
    items = [torch.randn(size, 3, generator=generator) for size in sizes]
    index = ragged_index(sizes, torch.device("cpu"))
    assert index.shape == (2, sum(sizes)) and index.dtype == torch.int64
    rows = torch.cat(items) if items else torch.zeros(0, 3)
    padded = pad_ragged(rows, index, len(sizes), max(sizes, default=0), -7.0)
    assert padded.shape == (len(sizes), max(sizes, default=0), 3)
    if items and max(sizes):
        torch.testing.assert_close(padded, pad_sequence(items, batch_first=True, padding_value=-7.0), rtol=0, atol=0)
    counter = collections.Counter(index[0].tolist())
    assert [counter[image] for image in range(len(sizes))] == sizes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_matcher_returning_cpu_indices_works_with_cuda_outputs():
    """DETR's own matcher returns its indices on the CPU; the per-image gathering moves them."""

    class HostIndexMatcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = HungarianMatcher(*COSTS, backend="scipy")

        def forward(self, outputs, targets):
            return [(rows.cpu(), cols.cpu()) for rows, cols in self.inner(outputs, targets)]

    generator = torch.Generator().manual_seed(61)
    targets = random_targets([2, 0, 4], generator)
    outputs, _ = make_outputs(2, 3, 6, generator)
    criterion = make_criterion("scipy", num_aux=1)
    expected = criterion(outputs, targets)
    criterion.matcher = HostIndexMatcher()
    on_cuda = {key: value.detach().cuda() for key, value in outputs.items() if key != "aux_outputs"}
    on_cuda["aux_outputs"] = [{key: value.detach().cuda() for key, value in layer.items()}
                              for layer in outputs["aux_outputs"]]
    losses = criterion.cuda()(on_cuda, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_attr", "loss_ce_0", "loss_bbox_0"):
        torch.testing.assert_close(losses[name].cpu(), expected[name].detach(), rtol=1e-9, atol=1e-12, msg=name)
