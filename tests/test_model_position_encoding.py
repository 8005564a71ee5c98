"""2-D sine position encoding against an element-by-element float64 formula."""
import math

import pytest
import torch

from fastvlp.nn.position_encoding import PositionEmbeddingSine


def reference_encoding(mask, num_pos_feats, temperature=10000.0, scale=2 * math.pi):
    """Loop over every cell: DETR's normalised sine encoding, written out in float64."""
    batch, height, width = mask.shape
    out = torch.zeros(batch, 2 * num_pos_feats, height, width, dtype=torch.float64)
    valid = (~mask).double()
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                y_count = valid[b, : y + 1, x].sum()
                x_count = valid[b, y, : x + 1].sum()
                y_pos = y_count / (valid[b, :, x].sum() + 1e-6) * scale
                x_pos = x_count / (valid[b, y, :].sum() + 1e-6) * scale
                for channel in range(num_pos_feats):
                    frequency = temperature ** (2 * (channel // 2) / num_pos_feats)
                    trig = math.sin if channel % 2 == 0 else math.cos
                    out[b, channel, y, x] = trig(y_pos / frequency)
                    out[b, num_pos_feats + channel, y, x] = trig(x_pos / frequency)
    return out


def test_matches_reference_with_padding():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 5:] = True
    encoding = PositionEmbeddingSine(6)(mask)
    assert encoding.shape == (2, 12, 5, 7) and encoding.dtype == torch.float32
    torch.testing.assert_close(encoding.double(), reference_encoding(mask, 6), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_valid_cells():
    """An image's encoding is the same whether or not the batch padded it."""
    alone = PositionEmbeddingSine(8)(torch.zeros(1, 3, 4, dtype=torch.bool))
    padded_mask = torch.ones(1, 6, 9, dtype=torch.bool)
    padded_mask[:, :3, :4] = False
    padded = PositionEmbeddingSine(8)(padded_mask)
    torch.testing.assert_close(padded[:, :, :3, :4], alone)


def test_not_normalised_counts_cells():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    encoding = PositionEmbeddingSine(4, normalize=False)(mask)
    # Channel 0 is sin(y / 1) with y counted from 1; channel 4 is sin(x / 1).
    torch.testing.assert_close(encoding[0, 0, :, 0], torch.sin(torch.arange(1, 4, dtype=torch.float32)))
    torch.testing.assert_close(encoding[0, 4, 0, :], torch.sin(torch.arange(1, 5, dtype=torch.float32)))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingSine(7)
    with pytest.raises(ValueError, match="scale"):
        PositionEmbeddingSine(8, normalize=False, scale=1.0)
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8)(torch.zeros(1, 3, 4))
