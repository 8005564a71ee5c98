"""Anchor boxes as the detection queries (DAB-DETR, Liu et al., ICLR 2022).

Each query is a learned box. In every decoder layer its positional query is an MLP of the box's sine
encoding, the same encoding the image tokens' positions get, so a query looks near its box from the start;
and each layer predicts its box as an offset (in logit space) from the box the layer before it predicted,
so the boxes are refined layer by layer. DETR's queries are free embeddings that have to learn where to
look, which is most of why DETR converges slowly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastvlp.models.heads import MLP

# Initial anchor sizes, as fractions of the image: about the size of a typical object.
_INITIAL_SIZE = 0.2


def sine_encode_boxes(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``boxes`` ``[..., 4]`` normalised (cx, cy, w, h) -> ``[..., 4 * num_feats]``: each coordinate times
    ``2 pi`` encoded as :class:`~fastvlp.nn.position_encoding.PositionEmbeddingSine` encodes a normalised
    position (even channels sines, odd channels cosines), in the order y, x, w, h so the first half lines up
    with the image tokens' (y, x) encoding."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected [..., 4] (cx, cy, w, h), got {list(boxes.shape)}")
    channel = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    frequency = temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / num_feats)
    cx, cy, w, h = (boxes.float() * 2 * math.pi).unbind(-1)
    encoded = []
    for value in (cy, cx, w, h):
        angles = value[..., None] / frequency
        encoded.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(encoded, dim=-1)


class AnchorQueries(nn.Module):
    """``num_queries`` learned anchor boxes and the MLP that turns a box into a positional query of width
    ``d_model``. The anchors' centres start spread uniformly at random over the image (seeded by the
    global RNG, as every other initialisation), their sizes at a fifth of the image."""

    def __init__(self, num_queries: int, d_model: int):
        super().__init__()
        if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries: expected a positive int, got {num_queries!r}")
        if d_model % 2:
            raise ValueError(f"d_model: expected an even width for the sine encoding, got {d_model}")
        self.num_feats = d_model // 2
        self.anchors = nn.Embedding(num_queries, 4)  # logits of (cx, cy, w, h)
        self.position_mlp = MLP(4 * self.num_feats, d_model, d_model, 2)
        with torch.no_grad():
            centres = torch.rand(num_queries, 2) * 0.9 + 0.05
            sizes = torch.full((num_queries, 2), _INITIAL_SIZE)
            self.anchors.weight.copy_(torch.logit(torch.cat((centres, sizes), dim=1)))

    def boxes(self) -> Tensor:
        """The anchors as normalised (cx, cy, w, h) ``[Q, 4]``."""
        return self.anchors.weight.sigmoid()

    def positional_query(self, boxes: Tensor) -> Tensor:
        """``boxes`` ``[..., 4]`` -> positional queries ``[..., d_model]`` in the MLP's dtype."""
        encoded = sine_encode_boxes(boxes, self.num_feats)
        return self.position_mlp(encoded.to(self.position_mlp.layers[0].weight.dtype))
