"""Padding into a batch: the mask marks exactly the padding, the pixels are copied unchanged."""

import pytest
import torch

from fastvlp.data.collate import NestedTensor, nested_tensor_from_images


@pytest.mark.parametrize("size_divisibility", [1, 32])
def test_mask_marks_exactly_the_padding(size_divisibility):
    sizes = [(int(h), int(w)) for h, w in torch.randint(5, 70, (4, 2))]
    images = [torch.randn(3, h, w) for h, w in sizes]
    batch = nested_tensor_from_images(images, size_divisibility)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    height, width = (
        -(-height // size_divisibility) * size_divisibility,
        -(-width // size_divisibility) * size_divisibility,
    )
    assert batch.tensors.shape == (4, 3, height, width) and batch.mask.shape == (4, height, width)
    assert batch.mask.dtype == torch.bool
    for i, (h, w) in enumerate(sizes):
        expected = torch.ones(height, width, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(batch.mask[i], expected)
        assert torch.equal(batch.tensors[i, :, :h, :w], images[i])
        assert torch.count_nonzero(batch.tensors[i][:, batch.mask[i]]) == 0
    tensors, mask = batch.decompose()
    assert tensors is batch.tensors and mask is batch.mask
    moved = batch.to("cpu")
    assert isinstance(moved, NestedTensor) and torch.equal(moved.mask, batch.mask)


def test_same_size_images_have_no_padding():
    images = [torch.randn(3, 8, 9) for _ in range(3)]
    batch = nested_tensor_from_images(images)
    assert not batch.mask.any() and torch.equal(batch.tensors, torch.stack(images))


def test_invalid_inputs():
    with pytest.raises(ValueError, match="images"):
        nested_tensor_from_images([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        nested_tensor_from_images([torch.randn(3, 4, 4), torch.randn(4, 4)])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        nested_tensor_from_images([torch.randn(3, 4, 4), torch.randn(1, 4, 4)])
    with pytest.raises(ValueError, match="size_divisibility"):
        nested_tensor_from_images([torch.randn(3, 4, 4)], 0)
    with pytest.raises(ValueError, match="size_divisibility"):
        nested_tensor_from_images([torch.randn(3, 4, 4)], True)
