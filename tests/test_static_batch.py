"""Batches of fixed shapes (detection rows and padded targets prepared on the host): the same losses and
gradients as the eager form, a forward and backward that read nothing back from the device, and clear errors."""
import pytest
import torch

from fastvlp.bench.train_step import synthetic_batch
from fastvlp.models import E2EVLP, get_preset, with_static_targets
from fastvlp.models.static_batch import pad_batch
from fastvlp.nn.matched_pairs import PaddedTargets, pad_set_targets
from fastvlp.ops.matching_cost import pad_targets
from fastvlp.train.host_reads import HostReadRecorder

# The criterion checks matched boxes' corner order only for CPU tensors (reading them on a GPU would be a sync).
CPU_ONLY_CHECKS = ("check_box_order",)


def _model_and_batch(matcher="fastvlp", seed=0, batch_size=6):
    torch.manual_seed(seed)
    config = get_preset("tiny", attention_backend="fastvlp", matcher_backend=matcher)
    model = E2EVLP(config).double().train()
    batch = synthetic_batch(config, batch_size, 64, 96, torch.Generator().manual_seed(seed + 1), "cpu")
    batch.images = batch.images.double()
    return model, batch


def _losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(batch)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
def test_static_batch_gives_the_eager_losses_and_gradients(seed):
    model, batch = _model_and_batch(seed=seed)
    largest = max(len(target["labels"]) for target in batch.targets)
    static = model.static_batch(batch, largest + 3)  # padded beyond the batch's own largest count
    assert static.padded_targets.labels.shape == (len(static.detection_rows), largest + 3)
    assert static.detection_rows.tolist() == [i for i, label in enumerate(batch.itm_labels.tolist()) if label == 1]
    eager, eager_grads = _losses_and_grads(model, batch)
    fixed, fixed_grads = _losses_and_grads(model, static)
    assert eager.losses.keys() == fixed.losses.keys()
    for name, value in eager.losses.items():
        torch.testing.assert_close(fixed.losses[name], value, rtol=1e-12, atol=1e-12, msg=name)
    assert eager_grads.keys() == fixed_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fixed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_static_forward_and_backward_read_nothing_back():
    model, batch = _model_and_batch()
    model.criterion.matcher.check_finite = False  # the finiteness check is a read by design; capture turns it off
    static = model.static_batch(batch, 20)
    _losses_and_grads(model, static)  # caches (class weights) fill on the first call, as in a warm-up
    with HostReadRecorder() as recorder:
        _losses_and_grads(model, static)
    reads = [record for record in recorder.records if not any(name in record for name in CPU_ONLY_CHECKS)]
    assert reads == []
    # The eager form chooses its rows and pads its targets from the data: the recorder sees those reads.
    with HostReadRecorder() as recorder:
        _losses_and_grads(model, batch)
    assert any("_detection_rows" in record for record in recorder.records)
    assert any("pad_targets" in record or "ragged_index" in record for record in recorder.records)


def test_padded_targets_with_scipy_matcher_use_the_per_image_targets():
    model, batch = _model_and_batch(matcher="scipy")
    eager, _ = _losses_and_grads(model, batch)
    fixed, _ = _losses_and_grads(model, model.static_batch(batch, 20))
    for name, value in eager.losses.items():
        torch.testing.assert_close(fixed.losses[name], value, rtol=1e-12, atol=1e-12, msg=name)
    padded = model.static_batch(batch, 20)
    with pytest.raises(ValueError, match="padded targets need the batched solver"):
        model.criterion({"pred_logits": torch.randn(len(padded.detection_rows), 5, 3, dtype=torch.float64),
                         "pred_boxes": torch.rand(len(padded.detection_rows), 5, 4, dtype=torch.float64)},
                        padded.padded_targets)


def test_static_batch_errors_name_the_argument():
    model, batch = _model_and_batch()
    # The largest object count among the rows that go to detection (the matched pairs).
    largest = max(len(target["labels"]) for target, label in zip(batch.targets, batch.itm_labels.tolist()) if label == 1)
    with pytest.raises(ValueError, match="max_targets"):
        model.static_batch(batch, largest - 1)
    with pytest.raises(ValueError, match="max_targets"):
        model.static_batch(batch, -1)
    bad = model.static_batch(batch, largest)
    bad.targets[int(bad.detection_rows[0])]["labels"][0] = model.config.num_classes
    with pytest.raises(ValueError, match="num_classes"):
        model.static_batch(bad, largest)
    batch.targets = None
    with pytest.raises(ValueError, match="batch: has no detection targets"):
        with_static_targets(batch, 4, 10)
    with pytest.raises(ValueError, match="max_targets"):
        model.static_batch(model.static_batch(_model_and_batch()[1], None), -2)
    static = model.static_batch(_model_and_batch()[1], largest)
    with pytest.raises(ValueError, match="detection_rows and padded_targets"):
        type(static)(**{**vars(static), "padded_targets": None})


def test_padded_targets_move_and_pad_to_a_fixed_length():
    labels = [torch.tensor([3, 1]), torch.tensor([], dtype=torch.int64), torch.tensor([7])]
    boxes = [torch.rand(2, 4), torch.zeros(0, 4), torch.rand(1, 4)]
    padded_labels, padded_boxes, counts = pad_targets(labels, boxes, torch.device("cpu"), length=5)
    assert padded_labels.shape == (3, 5) and padded_boxes.shape == (3, 5, 4)
    assert counts.tolist() == [2, 0, 1] and padded_labels[0, :2].tolist() == [3, 1] and padded_labels[2, 0] == 7
    assert torch.equal(padded_boxes[0, :2], boxes[0]) and (padded_boxes[0, 2:] == 0.5).all()
    with pytest.raises(ValueError, match="length"):
        pad_targets(labels, boxes, torch.device("cpu"), length=1)
    empty = pad_targets([], [], torch.device("cpu"), length=4)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0, 4, 4)
    targets = [{"labels": item, "boxes": box} for item, box in zip(labels, boxes)]
    padded = pad_set_targets(targets, torch.device("cpu"), num_attributes=3, length=4)
    moved = padded.to(torch.device("cpu"))
    assert isinstance(moved, PaddedTargets) and moved.sizes == [2, 0, 1]
    assert set(moved.tensors()) == {"labels", "boxes", "counts", "attributes"}
    assert moved.attributes.shape == (3, 4, 3) and not moved.attributes.any()


def test_padding_to_fixed_shapes_keeps_the_losses():
    """Texts padded to a fixed length give the same losses (the masks keep the padding out); images padded to a
    larger canvas are masked where padded."""
    torch.manual_seed(0)
    config = get_preset("tiny", attention_backend="fastvlp", matcher_backend="fastvlp", frozen_batch_norm=True)
    model = E2EVLP(config).double().train()
    batch = synthetic_batch(config, 4, 64, 96, torch.Generator().manual_seed(5), "cpu")
    batch.images = batch.images.double()
    short = 24  # texts and captions cut short, so that padding them to max_text_len adds positions
    batch = type(batch)(**{**vars(batch), **{name: getattr(batch, name)[:, :short] for name in (
        "input_ids", "text_attention_mask", "mlm_labels", "caption_ids", "caption_attention_mask")}})
    padded = pad_batch(batch, (96, 128), config.max_text_len, config.pad_token_id)
    assert padded.images.shape == (4, 3, 96, 128) and padded.pixel_mask[:, 64:].all() and padded.pixel_mask[:, :, 96:].all()
    assert padded.input_ids.shape[1] == padded.caption_ids.shape[1] == config.max_text_len
    assert not padded.text_attention_mask[:, short:].any() and (padded.input_ids[:, short:] == config.pad_token_id).all()
    assert (padded.mlm_labels[:, batch.input_ids.shape[1]:] == -100).all()
    eager = model(model.static_batch(batch, 20))
    fixed = model(model.static_batch(pad_batch(batch, (64, 96), config.max_text_len, config.pad_token_id), 20))
    for name, value in eager.losses.items():
        torch.testing.assert_close(fixed.losses[name], value, rtol=1e-9, atol=1e-9, msg=name)
    assert pad_batch(batch, (32, 128), config.max_text_len, config.pad_token_id) is None
    assert pad_batch(batch, (96, 128), short - 1, config.pad_token_id) is None


def test_pretraining_pads_targets_on_the_host_for_the_batched_solver():
    from fastvlp.train.pretrain import targets_padded_on_host

    model, batch = _model_and_batch()
    build = targets_padded_on_host(lambda collated, generator: batch, model)
    built = build(None, None)
    assert built.targets is None and built.padded_targets is not None
    largest = max(len(target["labels"]) for target, label in zip(batch.targets, batch.itm_labels.tolist()) if label == 1)
    assert built.padded_targets.labels.shape == (len(built.detection_rows), largest)
    eager, _ = _losses_and_grads(model, batch)
    padded, _ = _losses_and_grads(model, built)
    for name, value in eager.losses.items():
        assert torch.equal(padded.losses[name], value), name
    scipy_model, _ = _model_and_batch(matcher="scipy")
    assert targets_padded_on_host(build, scipy_model) is build  # DETR's per-image targets for any other matcher
