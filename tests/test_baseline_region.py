"""The bottom-up-attention region pipeline: detector structure, proposals, box selection, features, weights."""
import pytest
import torch
import torchvision
from torchvision.ops import box_iou, roi_align

pytest.importorskip("transformers")

from fastvlp.baselines.box_features import box_features
from fastvlp.baselines.box_selection import per_class_max_confidence, select_boxes
from fastvlp.baselines.region import RegionPipeline
from fastvlp.baselines.region_transformer import bert_base_config


def small_bert():
    return bert_base_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def small_pipeline(mode="thresholded", seed=0):
    return RegionPipeline(mode, bert_config=small_bert(), seed=seed, rpn_pre_nms_top_n=600,
                          rpn_post_nms_top_n=40).eval()


@pytest.fixture(scope="module")
def pipeline():
    return small_pipeline()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 112, 144, generator=generator)
    input_ids = torch.randint(5, 1000, (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return images, input_ids, attention_mask


def test_defaults_are_bottom_up_settings():
    import inspect

    from fastvlp.baselines.detector_c4 import BottomUpC4Detector

    defaults = {k: v.default for k, v in inspect.signature(BottomUpC4Detector).parameters.items()}
    assert defaults["num_classes"] == 1601 and defaults["num_attributes"] == 401
    assert defaults["rpn_pre_nms_top_n"] == 6000 and defaults["rpn_post_nms_top_n"] == 300
    assert defaults["rpn_nms_thresh"] == 0.7 and defaults["nms_thresh"] == 0.3 and defaults["conf_thresh"] == 0.2
    assert (defaults["min_boxes"], defaults["max_boxes"], defaults["fixed_boxes"]) == (10, 100, 36)
    assert defaults["roi_output_size"] == 14
    config = bert_base_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (12, 768, 12, 3072)


def test_detector_structure(pipeline):
    detector = pipeline.detector
    reference = torchvision.models.resnet101(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    names = [type(m).__name__ for m in detector.res4]
    assert names == ["Conv2d", "FrozenBatchNorm2d", "ReLU", "MaxPool2d", "Sequential", "Sequential", "Sequential"]
    for ours, theirs in zip(list(detector.res4)[4:], (reference.layer1, reference.layer2, reference.layer3)):
        assert len(ours) == len(theirs)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in detector.res5.state_dict().items()} == {k: v.shape for k, v in reference.layer4.state_dict().items()}
    with torch.inference_mode():
        res4 = detector.backbone(torch.randn(1, 3, 96, 128))
    assert res4.shape == (1, 1024, 6, 8)
    assert detector.cls_score.out_features == 1601
    assert detector.bbox_pred.out_features == 1601 * 4
    assert detector.attr_score.out_features == 401
    assert detector.attr_hidden.in_features == 2048 + detector.cls_embedding.embedding_dim
    assert detector.rpn.head.cls_logits.out_channels == 12  # 4 sizes x 3 ratios


@pytest.fixture(scope="module")
def stages(pipeline, inputs):
    images, input_ids, attention_mask = inputs
    with torch.inference_mode():
        res4 = pipeline.backbone(images)
        proposals = pipeline.rpn(images, res4)
        thresholded = pipeline.roi_heads(res4, proposals, (112, 144))
        fixed = RegionPipeline.roi_heads(_with_selection(pipeline, "fixed"), res4, proposals, (112, 144))
        output = pipeline(images, input_ids, attention_mask)
    return res4, proposals, thresholded, fixed, output


class _with_selection:
    """The pipeline's stages with another box selection, sharing its weights."""

    def __init__(self, pipeline, mode):
        self.detector, self.box_selection = pipeline.detector, mode


def test_proposals_and_detection_counts(stages):
    res4, proposals, thresholded, fixed, output = stages
    assert len(proposals) == 2
    for boxes in proposals:
        assert 36 <= boxes.shape[0] <= 40
        assert (boxes[:, 2] <= 144).all() and (boxes[:, 3] <= 112).all() and (boxes[:, :2] >= 0).all()
        iou = box_iou(boxes, boxes) - torch.eye(boxes.shape[0])
        assert iou.max() <= 0.7 + 1e-5  # the RPN's NMS ran
    for detections in thresholded:
        assert 10 <= detections.boxes.shape[0] <= 100
        assert detections.features.shape == (detections.boxes.shape[0], 2048)
        assert detections.attribute_scores.shape == (detections.boxes.shape[0], 401)
        assert (detections.confidence[:-1] >= detections.confidence[1:]).all()
    for detections in fixed:
        assert detections.boxes.shape[0] == 36 and detections.features.shape == (36, 2048)
    assert output.logits.shape == (2, 3129) and torch.isfinite(output.logits).all()
    assert [b.shape[0] for b in output.boxes] == [d.boxes.shape[0] for d in thresholded]
    for ours, again in zip(output.features, thresholded):
        torch.testing.assert_close(ours, again.features)


def test_box_features_equal_direct_roi_align_res5(pipeline, stages):
    res4, _, thresholded, fixed, _ = stages
    with torch.inference_mode():
        for index, kept in enumerate(thresholded + fixed):
            image = index % 2
            pooled = roi_align(res4[image:image + 1], [kept.boxes], 14, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
            direct = pipeline.detector.res5(pooled).mean(dim=(2, 3))
            torch.testing.assert_close(kept.features, direct, rtol=1e-4, atol=1e-5)


def _greedy_nms(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        if all(box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= threshold for j in kept):
            kept.append(i)
    return kept


def test_per_class_max_confidence_matches_a_per_class_loop():
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(13, 2, generator=generator, dtype=torch.float64) * 20
    boxes = torch.cat([corners, corners + 20 + torch.rand(13, 2, generator=generator, dtype=torch.float64) * 30], 1)
    scores = torch.rand(13, 6, generator=generator, dtype=torch.float64)
    expected = torch.zeros(13, dtype=torch.float64)
    for c in range(6):
        for i in _greedy_nms(boxes, scores[:, c], 0.3):
            expected[i] = max(expected[i], scores[i, c])
    got = per_class_max_confidence(boxes.float(), scores.float(), 0.3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    assert (got < scores.float().max(dim=1).values).any()  # NMS suppressed some best classes
    assert per_class_max_confidence(torch.zeros(0, 4), torch.zeros(0, 6)).shape == (0,)
    with pytest.raises(ValueError, match="class_scores"):
        per_class_max_confidence(boxes.float(), scores[:5].float())


@pytest.mark.parametrize("passing, expected", [(3, 10), (40, 40), (150, 100)])
def test_thresholded_selection_counts(passing, expected):
    generator = torch.Generator().manual_seed(passing)
    confidence = torch.rand(300, generator=generator) * 0.19
    confidence[torch.randperm(300, generator=generator)[:passing]] += 0.21
    keep = select_boxes(confidence, "thresholded")
    assert keep.shape == (expected,)
    assert torch.equal(keep, torch.argsort(confidence, descending=True)[:expected])


def test_fixed_selection_and_few_rois():
    confidence = torch.rand(50)
    assert torch.equal(select_boxes(confidence, "fixed"), torch.argsort(confidence, descending=True)[:36])
    assert select_boxes(torch.rand(7), "fixed").shape == (7,)
    assert select_boxes(torch.rand(7), "thresholded").shape == (7,)
    with pytest.raises(ValueError, match="mode"):
        select_boxes(confidence, "top")


def test_seven_d_box_features():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 200.0, 100.0]])
    expected = torch.tensor([[0.05, 0.2, 0.25, 0.8, 0.2, 0.6, 0.12], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(box_features(boxes.double(), (100, 200)), expected)
    with pytest.raises(ValueError, match="image_size"):
        box_features(boxes, (0, 200))
    with pytest.raises(ValueError, match="boxes"):
        box_features(boxes[:, :3], (100, 200))


def test_seeded_weights_and_global_rng(pipeline):
    state = torch.random.get_rng_state()
    again = small_pipeline(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    other = small_pipeline(seed=1)
    ours, same, different = pipeline.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(ours[k], same[k]) for k in ours)
    assert not torch.equal(ours["detector.cls_score.weight"], different["detector.cls_score.weight"])
    assert not torch.equal(ours["transformer.head.3.weight"], different["transformer.head.3.weight"])


def test_detector_weights_loader(pipeline, tmp_path):
    other = small_pipeline(seed=2)
    path = tmp_path / "detector.pt"
    torch.save(pipeline.detector.state_dict(), path)
    other.load_detector_weights(path)
    assert torch.equal(other.detector.bbox_pred.weight, pipeline.detector.bbox_pred.weight)
    state = dict(pipeline.detector.state_dict())
    del state["cls_score.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \['cls_score.bias'\].*1 unexpected keys \['extra.weight'\]"):
        other.load_detector_weights(state)
    state = dict(pipeline.detector.state_dict())
    state["attr_score.weight"] = torch.zeros(400, 512)
    with pytest.raises(ValueError, match="attr_score.weight"):
        other.load_detector_weights(state)
    with pytest.raises(FileNotFoundError):
        other.load_detector_weights(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="box_selection"):
        RegionPipeline("all")


def test_the_vqa_head_reads_the_pooled_cls_and_training_mode_is_refused(inputs):
    pipeline = small_pipeline()
    images, input_ids, attention_mask = inputs
    transformer = pipeline.transformer
    captured = {}
    hook = transformer.head.register_forward_hook(lambda module, args, output: captured.update(head_input=args[0]))
    with torch.no_grad():
        pipeline(images, input_ids, attention_mask)
        hook.remove()
        detections = pipeline.roi_heads(pipeline.backbone(images), pipeline.rpn(images, pipeline.backbone(images)),
                                         tuple(images.shape[-2:]))
        sequence = {}
        transformer.bert.encoder.register_forward_hook(lambda m, a, out: sequence.update(last=out.last_hidden_state))
        transformer(input_ids, attention_mask, [d.features for d in detections], [d.boxes for d in detections],
                    tuple(images.shape[-2:]))
    pooler = transformer.bert.pooler.dense
    expected = torch.tanh(sequence["last"][:, 0] @ pooler.weight.T + pooler.bias)
    torch.testing.assert_close(captured["head_input"], expected)
    with pytest.raises(RuntimeError, match=r"\.eval\(\)"):
        pipeline.train()(images, input_ids, attention_mask)


def test_selection_settings_are_checked():
    with pytest.raises(ValueError, match="conf_thresh"):
        small_pipeline_with(conf_thresh=1.5)
    with pytest.raises(ValueError, match="min_boxes, max_boxes"):
        small_pipeline_with(min_boxes=20, max_boxes=10)
    with pytest.raises(TypeError, match="min_boxes"):
        select_boxes(torch.rand(5), min_boxes=2.5)
    with pytest.raises(ValueError, match="threshold"):
        select_boxes(torch.rand(5), threshold=float("nan"))


def small_pipeline_with(**detector_kwargs):
    return RegionPipeline("thresholded", bert_config=small_bert(), rpn_pre_nms_top_n=600, rpn_post_nms_top_n=40,
                          **detector_kwargs)
