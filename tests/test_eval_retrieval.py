"""Retrieval recall against a sort-based reference, with ties (counted against the target), infinities and
caption-less images."""
import pytest
import torch

from fastvlp.eval import retrieval
from fastvlp.eval.retrieval import fill_score_matrix, retrieval_ranks, retrieval_recall


def reference_recall(scores, text_to_image, ks=(1, 5, 10)):
    """R@K by sorting each query's candidates, best first, with ties broken against the query's targets
    (among equal scores the targets sort last); a hit when a target's position is below K."""
    scores = scores.tolist()
    owners = text_to_image.tolist()
    num_images, num_texts = len(scores), len(owners)
    image_ranks = []
    for t in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-scores[i][t], i == owners[t]))
        image_ranks.append(order.index(owners[t]))
    text_ranks = []
    for i in range(num_images):
        if i not in owners:
            continue
        order = sorted(range(num_texts), key=lambda u: (-scores[i][u], owners[u] == i))
        text_ranks.append(min(position for position, u in enumerate(order) if owners[u] == i))
    result = {}
    for k in ks:
        result[f"txt_r{k}"] = sum(rank < k for rank in text_ranks) / len(text_ranks)
    for k in ks:
        result[f"img_r{k}"] = sum(rank < k for rank in image_ranks) / len(image_ranks)
    result["r_mean"] = sum(result.values()) / len(result)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_sorted_reference_with_ties(seed, monkeypatch):
    generator = torch.Generator().manual_seed(seed)
    num_images, num_texts = 13, 40
    # Few distinct values: many ties; some infinities.
    scores = torch.randint(-4, 5, (num_images, num_texts), generator=generator).double() / 2
    scores[torch.rand(num_images, num_texts, generator=generator) < 0.05] = torch.inf
    scores[torch.rand(num_images, num_texts, generator=generator) < 0.05] = -torch.inf
    text_to_image = torch.randint(0, num_images - 1, (num_texts,), generator=generator)  # last image: no caption
    got = retrieval_recall(scores, text_to_image)
    expected = reference_recall(scores, text_to_image)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # Row blocks that do not divide the images give the same ranks.
    whole = retrieval_ranks(scores, text_to_image)
    monkeypatch.setattr(retrieval, "_ROW_BLOCK", 5)
    blocked = retrieval_ranks(scores, text_to_image)
    assert all(torch.equal(whole[key], blocked[key]) for key in whole)


def test_recall_on_continuous_scores_and_perfect_scores():
    generator = torch.Generator().manual_seed(3)
    text_to_image = torch.arange(20).repeat_interleave(5)  # 5 captions per image, as in COCO
    scores = torch.randn(20, 100, generator=generator)
    got = retrieval_recall(scores, text_to_image)
    expected = reference_recall(scores, text_to_image)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    perfect = scores.clone()
    perfect[text_to_image, torch.arange(100)] = 10.0
    assert retrieval_recall(perfect, text_to_image) == {key: 1.0 for key in expected}


def test_constant_scores_earn_no_recall_from_ties():
    generator = torch.Generator().manual_seed(5)
    num_images = 12
    text_to_image = torch.arange(num_images).repeat_interleave(3)[torch.randperm(3 * num_images, generator=generator)]
    value = torch.randn((), generator=generator).item()
    constant = torch.full((num_images, 3 * num_images), value)
    ranks = retrieval_ranks(constant, text_to_image)
    # Every other candidate ties with the target and ranks before it.
    assert ranks["image_rank"].tolist() == [num_images - 1] * (3 * num_images)
    assert ranks["text_rank"].tolist() == [3 * num_images - 3] * num_images
    recall = retrieval_recall(constant, text_to_image)
    assert recall == {key: 0.0 for key in recall}  # 12 images, 36 captions: no target within 10
    assert retrieval_recall(constant, text_to_image) == reference_recall(constant, text_to_image)
    # With all the candidates within K the constant scorer hits, as any scorer would.
    assert retrieval_recall(constant[:3, :3], torch.tensor([0, 1, 2]), ks=(3,))["img_r3"] == 1.0


def test_ranks_small_example():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    ranks = retrieval_ranks(scores, torch.tensor([0, 1, 1]))
    # Caption 2 belongs to image 1 (0.7) and image 0 scores it 0.5: rank 0. Image 0's caption 0 leads its row.
    assert ranks["image_rank"].tolist() == [0, 0, 0]
    assert ranks["text_rank"].tolist() == [0, 0]
    ranks = retrieval_ranks(scores, torch.tensor([1, 0, 0]))
    assert ranks["image_rank"].tolist() == [1, 1, 1]
    assert ranks["text_rank"].tolist() == [1, 2]
    # Ties: image 1 scores caption 0 as high as its own image 0 does, which then ranks behind it; image 0's
    # own caption 2 ties with its caption 0 and never counts against it.
    tied = torch.tensor([[0.5, 0.1, 0.5], [0.5, 0.8, 0.7]])
    ranks = retrieval_ranks(tied, torch.tensor([0, 1, 0]))
    assert ranks["image_rank"].tolist() == [1, 0, 1]
    assert ranks["text_rank"].tolist() == [0, 0]


def test_fill_score_matrix_in_blocks():
    generator = torch.Generator().manual_seed(4)
    full = torch.randn(7, 11, generator=generator, dtype=torch.float64)
    calls = []

    def score_fn(images, texts):
        calls.append((len(images), len(texts)))
        return full[images][:, texts]

    filled = fill_score_matrix(score_fn, 7, 11, image_batch_size=3, text_batch_size=4, dtype=torch.float64)
    assert torch.equal(filled, full)
    assert len(calls) == 3 * 3 and (1, 3) in calls
    with pytest.raises(ValueError, match="score_fn"):
        fill_score_matrix(lambda i, t: torch.zeros(1, 1), 2, 2)


def test_invalid_inputs():
    scores = torch.randn(3, 4)
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(scores, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="text_to_image"):
        retrieval_recall(scores, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="scores"):
        retrieval_recall(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="scores"):
        retrieval_recall(torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(scores, torch.tensor([0, 1, 2, 0]), ks=(0,))
