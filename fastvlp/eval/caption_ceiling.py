"""What CIDEr a captioner could reach on the synthetic data if it knew every scene exactly.

The synthetic captions of an image come from several templates (an inventory, a count, a relation, ...), and
CIDEr scores a caption against all of an image's references at once. So a perfect captioner that always
writes one template scores only as well as that template agrees with the others. `caption_ceilings`
regenerates the scenes of a synthetic data set from its size and seed and scores, on its Karpathy test split:

- ``most_frequent_caption``: the training set's most frequent caption for every image, the demo's baseline;
- ``templates``: for each template, a freshly drawn true caption of that template for every image (the
  most frequent caption where the template has nothing to say about a scene, counted in ``fallbacks``);
- ``reference``: each image's first reference caption, i.e. a perfect captioner that writes one of the
  image's own references word for word.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from fastvlp.data.synth.captions import CAPTION_TEMPLATES, caption_from_template
from fastvlp.data.synth.generate import coco_images
from fastvlp.eval.caption_metrics import caption_scores
from fastvlp.train.tasks.caption import most_frequent_caption


def caption_ceilings(
    num_images: int = 512, seed: int = 0, *, use_java: Optional[bool] = None, sample_seed: int = 0
) -> Dict[str, object]:
    """CIDEr of the reference captioners above on the test split of ``fastvlp data synth --num-images
    num_images --seed seed``. ``sample_seed`` seeds the template captioners' choices (which object a count
    or relation caption speaks of). ``use_java`` is passed to :func:`caption_scores`."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    images, _ = coco_images(num_images, seed)
    train = [im for im in images if im.karpathy_split in ("train", "restval")]
    test = [im for im in images if im.karpathy_split == "test"]
    if not test or not train:
        raise ValueError(f"num_images: {num_images} images give no test or no training split; use at least 5")
    references = {im.image_id: list(im.captions) for im in test}
    top = most_frequent_caption(train)

    def cider(predictions: Dict[int, str]) -> float:
        return float(caption_scores(predictions, references, use_java=use_java)["cider"])

    templates, fallbacks = {}, {}
    for index, name in enumerate(CAPTION_TEMPLATES):
        rng = np.random.default_rng([sample_seed, index])
        written = {im.image_id: caption_from_template(name, rng, im.scene) for im in test}
        fallbacks[name] = sum(caption is None for caption in written.values())
        templates[name] = cider({k: top if v is None else v for k, v in written.items()})
    return {
        "num_test_images": len(test),
        "most_frequent_caption": cider({image_id: top for image_id in references}),
        "templates": templates,
        "fallbacks": fallbacks,
        "reference": cider({im.image_id: im.captions[0] for im in test}),
    }

