"""Group DETR's query groups: the group-major layout, the repeated targets, each group decoding as an
ordinary query set on its own, inference on the first group, and the losses of identical groups."""
import pytest
import torch
from test_model_e2e_vlp import small_config, synthetic_batch

from fastvlp.models import E2EVLP
from fastvlp.models.outputs import EncoderOutput
from fastvlp.models.query_groups import queries_by_group, repeat_batch, repeat_targets
from fastvlp.nn.matched_pairs import PaddedTargets

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES, GROUPS = 4, 3


def grouped_model(**changes):
    torch.manual_seed(0)
    return E2EVLP(small_config(num_queries=QUERIES, query_groups=GROUPS, **changes)).double()


def random_encoding(batch=2, length=7, width=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 5:] = True
    return EncoderOutput(memory=torch.randn(batch, length, width, generator=generator, dtype=torch.float64),
                         padding_mask=padding,
                         pos=torch.randn(batch, length, width, generator=generator, dtype=torch.float64),
                         text_length=0, spatial_shape=(1, length))


def test_queries_are_laid_out_group_major_along_the_batch():
    queries = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(6, 5)  # 2 groups of 3 queries
    grouped = queries_by_group(queries, groups=2, batch=4)
    assert grouped.shape == (3, 8, 5)
    for group in range(2):
        for image in range(4):
            torch.testing.assert_close(grouped[:, group * 4 + image], queries[group * 3:(group + 1) * 3])
    with pytest.raises(ValueError, match="queries"):
        queries_by_group(queries, groups=4, batch=1)
    tensor = torch.randn(2, 3)
    torch.testing.assert_close(repeat_batch(tensor, 3), torch.cat([tensor, tensor, tensor]))
    assert repeat_batch(tensor, 1) is tensor


def test_targets_repeat_once_per_group_as_dicts_and_padded():
    targets = [{"labels": torch.tensor([1, 2])}, {"labels": torch.tensor([3])}]
    repeated = repeat_targets(targets, 3)
    assert [t["labels"].tolist() for t in repeated] == [[1, 2], [3]] * 3
    padded = PaddedTargets(labels=torch.tensor([[1, 2], [3, 0]]), boxes=torch.rand(2, 2, 4),
                           counts=torch.tensor([2, 1]), sizes=[2, 1])
    grouped = repeat_targets(padded, 2)
    assert grouped.labels.tolist() == [[1, 2], [3, 0], [1, 2], [3, 0]]
    assert grouped.counts.tolist() == [2, 1, 2, 1] and grouped.sizes == [2, 1, 2, 1]
    torch.testing.assert_close(grouped.boxes[2:], padded.boxes)
    assert grouped.attributes is None
    assert repeat_targets(padded, 1) is padded
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="groups"):
            repeat_targets(targets, bad)


@pytest.mark.parametrize("anchor_queries", [False, True])
def test_each_group_decodes_as_its_own_query_set_and_inference_reads_the_first(anchor_queries):
    model = grouped_model(anchor_queries=anchor_queries)
    encoded = random_encoding()
    key = "query_anchors.anchors.weight" if anchor_queries else "query_embed.weight"
    assert model.state_dict()[key].shape[0] == QUERIES * GROUPS
    model.train()
    assert model.detection_query_groups == GROUPS
    grouped = model.detect(encoded)
    assert grouped.pred_logits.shape[:2] == (GROUPS * 2, QUERIES)
    assert len(grouped.aux_outputs) == 1 and grouped.aux_outputs[0]["pred_boxes"].shape == (GROUPS * 2, QUERIES, 4)
    single = E2EVLP(model.config.replace(query_groups=1)).double().eval()
    for group in range(GROUPS):
        weights = model.state_dict()
        weights[key] = weights[key][group * QUERIES:(group + 1) * QUERIES]
        single.load_state_dict(weights)
        alone = single.detect(encoded)
        rows = slice(group * 2, (group + 1) * 2)
        torch.testing.assert_close(grouped.pred_logits[rows], alone.pred_logits)
        torch.testing.assert_close(grouped.pred_boxes[rows], alone.pred_boxes)
        torch.testing.assert_close(grouped.aux_outputs[0]["pred_boxes"][rows], alone.aux_outputs[0]["pred_boxes"])
    model.eval()
    assert model.detection_query_groups == 1
    first = model.detect(encoded)
    torch.testing.assert_close(first.pred_logits, grouped.pred_logits[:2])
    torch.testing.assert_close(first.pred_boxes, grouped.pred_boxes[:2])


def test_identical_groups_give_the_single_groups_losses_and_every_group_trains():
    batch = synthetic_batch()
    model = grouped_model().float().train()
    with torch.no_grad():  # every group a copy of the first
        model.query_embed.weight.copy_(model.query_embed.weight[:QUERIES].repeat(GROUPS, 1))
    single = E2EVLP(model.config.replace(query_groups=1)).train()
    weights = model.state_dict()
    weights["query_embed.weight"] = weights["query_embed.weight"][:QUERIES]
    single.load_state_dict(weights)
    grouped_output, single_output = model(batch), single(batch)
    rows = len(single_output.detection_rows)
    assert rows >= 2  # images with different targets, so that a misaligned repeat would show
    assert grouped_output.detection.pred_logits.shape[0] == GROUPS * rows
    for name in ("loss_det", "loss_ce", "loss_bbox", "loss_giou", "loss_attr"):
        torch.testing.assert_close(grouped_output.losses[name], single_output.losses[name], rtol=1e-5, atol=1e-6)
    grouped_output.losses["loss_det"].backward()
    per_group = model.query_embed.weight.grad.reshape(GROUPS, QUERIES, -1)
    assert all(per_group[group].abs().sum() > 0 for group in range(GROUPS))


def test_query_groups_must_be_a_positive_int():
    for bad, error in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="query_groups"):
            small_config(query_groups=bad)
