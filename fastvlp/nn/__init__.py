"""Drop-in modules built on :mod:`fastvlp.ops`."""
from fastvlp.nn.frozen_batch_norm import FrozenBatchNorm2d
from fastvlp.nn.matcher import HungarianMatcher
from fastvlp.nn.multihead_attention import MultiheadAttention, MultiheadAttentionInputError

__all__ = ["FrozenBatchNorm2d", "HungarianMatcher", "MultiheadAttention", "MultiheadAttentionInputError"]
