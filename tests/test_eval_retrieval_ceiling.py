"""The tint-matching retrieval ceiling (fastvlp.eval.retrieval_ceiling) against brute force over every ranking."""
import itertools

import pytest

from fastvlp.data.records import ImageRecord
from fastvlp.eval.retrieval_ceiling import attribute_matching_recall, background_tint, tint_matching_recall


def brute_force(image_attributes, caption_attributes, caption_images, k):
    """Average over every ordering in which the candidates of the query's attribute come first."""

    def mean_hit(candidates, in_group, own):
        hits = total = 0
        for order in itertools.permutations(candidates):
            if any(in_group(a) < in_group(b) for a, b in zip(order, order[1:])):
                continue  # a candidate of the group after one outside it
            total += 1
            hits += any(c in own for c in order[:k])
        return hits / total

    captions, images = range(len(caption_attributes)), range(len(image_attributes))
    text = [mean_hit(captions, lambda c, i=i: caption_attributes[c] is not None and caption_attributes[c] == image_attributes[i],
                     {c for c in captions if caption_images[c] == i}) for i in images]
    image = [mean_hit(images, lambda i, c=c: caption_attributes[c] is not None and image_attributes[i] == caption_attributes[c],
                      {caption_images[c]}) for c in captions]
    return sum(text) / len(text), sum(image) / len(image)


CASES = [
    # two images of one tint, one of another; two captions each
    (["red", "red", "blue"], ["red", "red", "red", "red", "blue", "blue"], [0, 0, 1, 1, 2, 2]),
    # a caption that names another tint than its image's, one that names none, and an image with no tint
    (["red", "blue", None, "red"], ["red", "blue", "blue", None, "red", "green", "red"], [0, 0, 1, 1, 2, 3, 3]),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_expected_recall_matches_every_ranking(case, k):
    image_attributes, caption_attributes, caption_images = case
    recall = attribute_matching_recall(image_attributes, caption_attributes, caption_images, ks=(k,))
    text, image = brute_force(image_attributes, caption_attributes, caption_images, k)
    assert recall[f"txt_r{k}"] == pytest.approx(text, abs=1e-12)
    assert recall[f"img_r{k}"] == pytest.approx(image, abs=1e-12)


def test_all_candidates_within_k_give_recall_one_and_distinct_attributes_give_perfect_recall():
    recall = attribute_matching_recall(["a", "b"], ["a", "b", "b"], [0, 1, 1], ks=(1, 3))
    assert recall == {"txt_r1": 1.0, "img_r1": 1.0, "txt_r3": 1.0, "img_r3": 1.0}


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="caption_images"):
        attribute_matching_recall(["a"], ["a", "a"], [0])
    with pytest.raises(ValueError, match="caption_images"):
        attribute_matching_recall(["a"], ["a"], [1])
    with pytest.raises(ValueError, match="ks"):
        attribute_matching_recall(["a"], ["a"], [0], ks=(0,))
    with pytest.raises(ValueError, match="image_attributes"):
        attribute_matching_recall([], [], [])


def test_tints_are_read_from_the_captions(tmp_path):
    assert background_tint("A red star to the left of a blue triangle on cream.") == "cream"
    assert background_tint("Green, orange and red shapes on a plain lime background.") == "lime"
    assert background_tint("A red star.") is None and background_tint("pink and cyan") is None
    records = [ImageRecord("flickr30k", i, tmp_path / f"{i}.jpg", captions=tuple(captions))
               for i, captions in enumerate([["a star on cream.", "cream: a star"], ["a square on lime.", "a square"]])]
    recall = tint_matching_recall(records, ks=(1,))
    expected = attribute_matching_recall(["cream", "lime"], ["cream", "cream", "lime", None], [0, 0, 1, 1], ks=(1,))
    assert recall == expected
