"""What retrieval recall does knowing one attribute of each pair give? The synthetic captions all name their
image's background tint, so a score that compares the tints, and knows nothing else, ranks the candidates
of the query's tint first, in random order among themselves, and the rest after them, in random order too.
:func:`attribute_matching_recall` gives that score's expected recall at K exactly (no sampling), for text
retrieval (an image ranks every caption) and image retrieval (a caption ranks every image); a model's
recall above it shows that the model compares more than that attribute.
"""
from __future__ import annotations

from math import comb
from typing import Dict, Hashable, Optional, Sequence

from fastvlp.data.synth.palette import BACKGROUNDS


def _hit_probability(group: int, own_in_group: int, rest: int, own_in_rest: int, k: int) -> float:
    """P(at least one of the query's own candidates lies in the top ``k``) when the ``group`` candidates of the
    query's attribute (``own_in_group`` of them its own) come first in random order, then the ``rest``
    (``own_in_rest`` its own) in random order."""
    if k <= group:
        return 1.0 - comb(group - own_in_group, k) / comb(group, k)
    if own_in_group:
        return 1.0
    taken = min(k - group, rest)
    return 1.0 - comb(rest - own_in_rest, taken) / comb(rest, taken) if rest else 0.0


def attribute_matching_recall(image_attributes: Sequence[Hashable], caption_attributes: Sequence[Hashable],
                              caption_images: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Expected recall of a score that ranks the candidates sharing the query's attribute first.

    ``image_attributes[i]`` is image ``i``'s attribute, ``caption_attributes[c]`` caption ``c``'s (None: it
    names none, and matches no image), ``caption_images[c]`` the image caption ``c`` belongs to. Returns
    ``txt_r{k}`` (mean over images of the chance that one of their captions ranks within ``k``) and
    ``img_r{k}`` (mean over captions of the chance that their image does), as :mod:`fastvlp.eval.retrieval`
    defines them.
    """
    num_images, num_captions = len(image_attributes), len(caption_attributes)
    if len(caption_images) != num_captions:
        raise ValueError(f"caption_images: expected {num_captions} entries like caption_attributes, got {len(caption_images)}")
    if any(not 0 <= i < num_images for i in caption_images):
        raise ValueError(f"caption_images: expected image indices in [0, {num_images})")
    if not num_images or not num_captions:
        raise ValueError("image_attributes, caption_attributes: expected at least one image and one caption")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {list(ks)}")
    captions_with: Dict[Hashable, int] = {}
    for attribute in caption_attributes:
        if attribute is not None:
            captions_with[attribute] = captions_with.get(attribute, 0) + 1
    images_with: Dict[Hashable, int] = {}
    for attribute in image_attributes:
        images_with[attribute] = images_with.get(attribute, 0) + 1
    own_captions = [[0, 0] for _ in range(num_images)]  # per image: its captions of its attribute, the others
    for caption, image in enumerate(caption_images):
        attribute = caption_attributes[caption]
        own_captions[image][0 if attribute is not None and attribute == image_attributes[image] else 1] += 1
    result: Dict[str, float] = {}
    for k in ks:
        text = 0.0
        for image, attribute in enumerate(image_attributes):
            group = captions_with.get(attribute, 0)
            inside, outside = own_captions[image]
            text += _hit_probability(group, inside, num_captions - group, outside, k)
        image_recall = 0.0
        for caption, attribute in enumerate(caption_attributes):
            group = images_with.get(attribute, 0) if attribute is not None else 0
            inside = int(attribute is not None and image_attributes[caption_images[caption]] == attribute)
            image_recall += _hit_probability(group, inside, num_images - group, 1 - inside, k)
        result[f"txt_r{k}"] = text / num_images
        result[f"img_r{k}"] = image_recall / num_captions
    return result


def background_tint(text: str) -> Optional[str]:
    """The synthetic background tint that ``text`` names (None if it names none or several)."""
    words = set(text.lower().replace(".", " ").replace(",", " ").replace(":", " ").split())
    named = [tint for tint in BACKGROUNDS if tint in words]
    return named[0] if len(named) == 1 else None


def tint_matching_recall(records, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """:func:`attribute_matching_recall` over the background tints of ``records`` (Karpathy-format
    :class:`~fastvlp.data.records.ImageRecord` s with captions): each caption's tint is the one it names,
    each image's the one most of its captions name (the first in alphabetical order on a tie)."""
    image_tints, caption_tints, caption_images = [], [], []
    for index, record in enumerate(records):
        tints = [background_tint(caption) for caption in record.captions]
        named = [t for t in tints if t is not None]
        image_tints.append(max(sorted(set(named)), key=named.count) if named else None)
        caption_tints.extend(tints)
        caption_images.extend([index] * len(tints))
    return attribute_matching_recall(image_tints, caption_tints, caption_images, ks)
