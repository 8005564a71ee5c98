"""`caption_ceilings` regenerates exactly the captions `fastvlp data synth` writes, and scores them."""
import math

import numpy as np
import pytest

from fastvlp.data.synth.captions import CAPTION_TEMPLATES, caption_from_template
from fastvlp.data.synth.generate import coco_images, write_synthetic_dataset
from fastvlp.eval.caption_ceiling import caption_ceilings
from fastvlp.eval.caption_metrics import caption_scores
from fastvlp.train.tasks.caption import most_frequent_caption, read_caption_records

NUM_IMAGES, SEED = 40, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, num_images=NUM_IMAGES, seed=SEED, datasets=("coco",))
    return out


@pytest.fixture(scope="module")
def ceilings():
    return caption_ceilings(NUM_IMAGES, SEED, use_java=False)


def test_baseline_and_reference_match_the_written_data(written, ceilings):
    train = read_caption_records(written, "train").records
    test = read_caption_records(written, "test").records
    assert ceilings["num_test_images"] == len(test) > 0
    references = {r.image_id: list(r.captions) for r in test}
    top = most_frequent_caption(train)  # the demo's baseline caption, from the files on disk

    def cider(predictions):
        return caption_scores(predictions, references, use_java=False)["cider"]

    assert ceilings["most_frequent_caption"] == pytest.approx(cider({k: top for k in references}), rel=1e-9)
    assert ceilings["reference"] == pytest.approx(cider({r.image_id: r.captions[0] for r in test}), rel=1e-9)
    assert ceilings["reference"] > ceilings["most_frequent_caption"]


def test_every_template_is_scored(ceilings):
    assert set(ceilings["templates"]) == set(CAPTION_TEMPLATES)
    for name, score in ceilings["templates"].items():
        assert math.isfinite(score) and score >= 0.0, name
        assert 0 <= ceilings["fallbacks"][name] <= ceilings["num_test_images"]
    # The templates say different things, so they cannot all score alike.
    assert len({round(s, 6) for s in ceilings["templates"].values()}) > 1


def test_template_captions_are_true_sentences():
    images, _ = coco_images(12, SEED)
    rng = np.random.default_rng(0)
    for image in images:
        colours = {obj.colour for obj in image.scene.objects}
        caption = caption_from_template("colour", rng, image.scene)
        assert caption[0].isupper() and caption.endswith(".")
        assert {word.strip(",.").lower() for word in caption.split()} >= colours
    with pytest.raises(ValueError, match="name"):
        caption_from_template("poem", rng, images[0].scene)


@pytest.mark.parametrize("kwargs, argument", [({"num_images": 0}, "num_images"), ({"num_images": 2}, "num_images"),
                                              ({"seed": -1}, "seed")])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        caption_ceilings(**kwargs, use_java=False)
