"""Drop-in modules built on :mod:`fastvlp.ops`."""
from fastvlp.nn.matcher import HungarianMatcher
from fastvlp.nn.multihead_attention import MultiheadAttention, MultiheadAttentionInputError

__all__ = ["HungarianMatcher", "MultiheadAttention", "MultiheadAttentionInputError"]
