"""Torch datasets: targets built from the records, lazy decoding with unreadable images skipped and counted."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastvlp.data.datasets import (
    ImageRecordDataset,
    Nlvr2Dataset,
    SkippedSample,
    VqaDataset,
    build_answer_vocabulary,
    collate_samples,
    soft_scores,
)
from fastvlp.data.datasets.image_records import ImageRecordView
from fastvlp.data.label_space import LabelSpace
from fastvlp.data.pretraining import read_pretraining_images
from fastvlp.data.readers import read_nlvr2, read_vqa
from fastvlp.data.records import VqaRecord
from fastvlp.data.skips import MISSING_IMAGE, UNREADABLE_IMAGE
from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.data.transforms import SCALE_PRESETS, TINY_SHORT_SIDES, ImageTransform, train_transform


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(
        out, num_images=8, seed=int(np.random.randint(0, 10_000)), datasets=("coco", "vqa", "vg", "nlvr2")
    )
    return out


def _truncated_copy(path: Path, tmp_path: Path) -> Path:
    data = path.read_bytes()
    target = tmp_path / ("broken" + path.suffix)
    target.write_bytes(data[: len(data) // 2])
    return target


def test_image_record_targets(synth_dir):
    records = read_pretraining_images(synth_dir).records
    objects = LabelSpace.from_vocab_file(synth_dir / "vg/objects_vocab.txt")
    attributes = LabelSpace.from_vocab_file(synth_dir / "vg/attributes_vocab.txt")
    categories = read_pretraining_images(synth_dir, use_visual_genome=False).categories
    objects, category_to_label = objects.with_coco_categories(categories)
    dataset = ImageRecordDataset(records, train_transform("tiny"), objects, attributes, category_to_label)
    assert len(dataset) == len(records)
    for record, sample in zip(records, (dataset[i] for i in range(len(dataset)))):
        n = len(record.objects)
        assert sample["labels"].tolist() == [objects.index(o.name) for o in record.objects]
        boxes = torch.tensor([o.box for o in record.objects], dtype=torch.float64).reshape(-1, 4)
        width, height = record.width, record.height
        expected = torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2 / width,
                (boxes[:, 1] + boxes[:, 3]) / 2 / height,
                (boxes[:, 2] - boxes[:, 0]) / width,
                (boxes[:, 3] - boxes[:, 1]) / height,
            ],
            dim=1,
        )
        torch.testing.assert_close(sample["boxes"].double(), expected, atol=1e-5, rtol=0)
        assert sample["attributes"].shape == (n, len(attributes))
        for row, obj in zip(sample["attributes"], record.objects):
            assert sorted(attributes.name(i) for i in torch.nonzero(row).flatten().tolist()) == sorted(obj.attributes)
        assert torch.equal(sample["has_attributes"], torch.tensor([bool(o.attributes) for o in record.objects]))
        assert sample["captions"] == list(record.captions) and sample["unlabelled_objects"] == 0
        assert sample["original_size"] == (height, width) and sample["image"].shape[1:] == sample["size"]
    assert any(s["has_attributes"].any() for s in (dataset[i] for i in range(len(dataset))) if len(s["labels"]))


def test_objects_outside_the_label_space_are_dropped(synth_dir):
    records = read_pretraining_images(synth_dir, use_coco=False).records
    space = LabelSpace(["circle", "square"])
    dataset = ImageRecordDataset(records, train_transform("tiny"), space)
    for i, record in enumerate(records):
        sample = dataset[i]
        kept = [o for o in record.objects if o.name in ("circle", "square")]
        assert sample["labels"].tolist() == [space.index(o.name) for o in kept]
        assert sample["boxes"].shape == (len(kept), 4) and sample["attributes"].shape == (len(kept), 0)
        assert sample["unlabelled_objects"] == len(record.objects) - len(kept)
    captions_only = ImageRecordDataset(records, train_transform("tiny"))[0]
    assert captions_only["boxes"].shape == (0, 4) and captions_only["unlabelled_objects"] == 0


def test_unreadable_images_are_skipped_in_the_batch(synth_dir, tmp_path):
    records = read_pretraining_images(synth_dir, use_visual_genome=False).records[:4]
    records[1] = replace(records[1], image_path=_truncated_copy(records[1].image_path, tmp_path))
    records[3] = replace(records[3], image_path=tmp_path / "gone.jpg")
    dataset = ImageRecordDataset(records, train_transform("tiny"))
    assert dataset[1] == SkippedSample(1, UNREADABLE_IMAGE, str(records[1].image_path))
    assert dataset[3].reason == MISSING_IMAGE
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert batch["skipped"] == {UNREADABLE_IMAGE: 1, MISSING_IMAGE: 1} and batch["num_samples"] == 2
    assert batch["image_id"] == [records[0].image_id, records[2].image_id]
    for i, (h, w) in enumerate(batch["size"]):
        assert (
            not batch["image"].mask[i, :h, :w].any()
            and batch["image"].mask[i].sum() == batch["image"].mask[i].numel() - h * w
        )
    empty = collate_samples([dataset[1]])
    assert empty == {"skipped": {UNREADABLE_IMAGE: 1}, "num_samples": 0}


class _ImageIdAndIndex(ImageRecordView):
    def view(self, sample, index):
        return {"image_id": sample["image_id"], "index": index}


def test_a_view_maps_readable_samples_and_passes_skipped_ones_through(synth_dir, tmp_path):
    records = read_pretraining_images(synth_dir, use_visual_genome=False).records[:3]
    records[1] = replace(records[1], image_path=_truncated_copy(records[1].image_path, tmp_path))
    view = _ImageIdAndIndex(ImageRecordDataset(records, train_transform("tiny")))
    assert len(view) == 3 and view.records == records
    assert view[0] == {"image_id": records[0].image_id, "index": 0}
    assert view[1] == SkippedSample(1, UNREADABLE_IMAGE, str(records[1].image_path))
    assert view[2] == {"image_id": records[2].image_id, "index": 2}
    with pytest.raises(TypeError, match="inner"):
        _ImageIdAndIndex(records)


def test_soft_scores_and_answer_vocabulary():
    rng = np.random.default_rng()
    vocabulary = ["yes", "no", "2", "red", "blue"]
    index = {a: i for i, a in enumerate(vocabulary)}
    for _ in range(20):
        answers = [str(a) for a in rng.choice(vocabulary + ["other"], size=10)]
        expected = np.zeros(len(vocabulary), dtype=np.float64)
        for i, answer in enumerate(vocabulary):
            count = answers.count(answer)
            expected[i] = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(count, 1.0)
        torch.testing.assert_close(soft_scores(answers, index).double(), torch.from_numpy(expected), atol=1e-7, rtol=0)
    two = soft_scores(["two", "2", "2"], index, normalise=lambda a: {"two": "2"}.get(a, a))
    assert two[index["2"]] == pytest.approx(0.9)
    records = [
        VqaRecord(i, 1, Path("x.jpg"), "q", (), a)
        for i, a in enumerate(["no", "yes", "no", "red", "blue", "yes", "no"])
    ]
    assert build_answer_vocabulary(records) == ["no", "yes", "blue", "red"]
    assert build_answer_vocabulary(records, max_answers=2) == ["no", "yes"]


def test_vqa_and_nlvr2_datasets(synth_dir, tmp_path):
    records = read_vqa(synth_dir / "vqa", synth_dir / "coco", "train").records
    vocabulary = build_answer_vocabulary(records)
    dataset = VqaDataset(records, train_transform("tiny"), vocabulary)
    batch = collate_samples([dataset[i] for i in range(4)])
    assert batch["target"].shape == (4, len(vocabulary)) and batch["question"] == [r.question for r in records[:4]]
    for row, record in zip(batch["target"], records[:4]):
        assert row[vocabulary.index(record.multiple_choice_answer)] >= 0.9

    pairs = read_nlvr2(synth_dir / "nlvr2", "train").records
    pairs[0] = replace(pairs[0], right_image_path=_truncated_copy(pairs[0].right_image_path, tmp_path))
    dataset = Nlvr2Dataset(pairs, train_transform("tiny"))
    assert isinstance(dataset[0], SkippedSample) and dataset[0].reason == UNREADABLE_IMAGE
    batch = collate_samples([dataset[i] for i in range(len(pairs))])
    assert batch["num_samples"] == len(pairs) - 1 and batch["skipped"] == {UNREADABLE_IMAGE: 1}
    assert batch["label"] == [p.label for p in pairs[1:]] and batch["left_image"].tensors.shape[0] == len(pairs) - 1
    for key in ("left_image", "right_image"):
        for mask in batch[key].mask:
            h, w = int((~mask).any(dim=1).sum()), int((~mask).any(dim=0).sum())
            assert (~mask).sum() == h * w  # the valid pixels form the top-left rectangle
            assert min(h, w) in TINY_SHORT_SIDES or max(h, w) == SCALE_PRESETS["tiny"].max_size
    with pytest.raises(ValueError, match="flip"):
        Nlvr2Dataset(pairs, ImageTransform((128,), 256, horizontal_flip=True))
    with pytest.raises(TypeError, match="transform"):
        VqaDataset(records, lambda image: image)


def test_vqa_dataset_refuses_flips():
    """Questions such as "Is the cup on the left?" would get the unflipped image's answer."""
    records = [VqaRecord(1, 7, Path("7.jpg"), "Is the cup on the left?", ("yes",) * 10, "yes")]
    for transform in (ImageTransform((128,), 256, horizontal_flip=True), train_transform("tiny", horizontal_flip=True)):
        with pytest.raises(ValueError, match="^transform: expected no horizontal flip for VQA$"):
            VqaDataset(records, transform, ["yes"])
    assert len(VqaDataset(records, train_transform("tiny"), ["yes"])) == 1


def test_a_box_outside_the_decoded_image_is_dropped_with_its_label_and_attributes(synth_dir):
    from fastvlp.data.records import ObjectAnnotation

    record = read_pretraining_images(synth_dir).records[0]
    objects = LabelSpace(["circle", "square"])
    attributes = LabelSpace(["red", "blue"])
    from PIL import Image

    width, height = Image.open(record.image_path).size
    inside = ObjectAnnotation((1.0, 2.0, 11.0, 12.0), "circle", ("red",))
    # No image size in the annotation: the reader could not clip this one, which lies right of the image.
    outside = ObjectAnnotation((width + 10.0, 2.0, width + 15.0, 7.0), "square", ("blue",))
    record = replace(record, objects=(outside, inside), width=None, height=None)
    sample = ImageRecordDataset([record], ImageTransform((64,), None), objects, attributes)[0]
    assert sample["labels"].tolist() == [0] and sample["boxes"].shape == (1, 4)
    assert (sample["boxes"][:, 2:] > 0).all()
    assert sample["attributes"].tolist() == [[True, False]]
    assert sample["empty_boxes"] == 1 and sample["unlabelled_objects"] == 0
