"""E2E-VLP: configuration and presets, the model and its parts, pre-training inputs and outputs."""
from fastvlp.models.backbone import Backbone, VisualTokens
from fastvlp.models.caption_cache import IncrementalCaptionDecoder
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP, token_cross_entropy
from fastvlp.models.generation import generate_captions, gnmt_length_penalty
from fastvlp.models.heads import MLP, DetectionHeads, ImageTextMatchingHead, TokenPredictionHead
from fastvlp.models.masking import IGNORE_INDEX, mask_tokens
from fastvlp.models.outputs import DetectionOutput, EncoderOutput, PretrainingOutput
from fastvlp.models.presets import (
    PAPER_PARAMETER_COUNTS,
    PRESETS,
    count_parameters,
    get_preset,
    list_presets,
    preset_parameter_counts,
)
from fastvlp.models.pretraining_batch import PretrainingBatch, make_pretraining_batch, mismatch_texts
from fastvlp.models.static_batch import with_static_targets
from fastvlp.models.static_caption_cache import CapturedCaptionDecoder, StaticCaptionDecoder
from fastvlp.models.text_embeddings import TextEmbeddings
from fastvlp.models.transformer import TransformerDecoder, TransformerEncoder

__all__ = [
    "IGNORE_INDEX",
    "MLP",
    "PAPER_PARAMETER_COUNTS",
    "PRESETS",
    "Backbone",
    "CapturedCaptionDecoder",
    "DetectionHeads",
    "DetectionOutput",
    "E2EVLP",
    "E2EVLPConfig",
    "EncoderOutput",
    "ImageTextMatchingHead",
    "IncrementalCaptionDecoder",
    "PretrainingBatch",
    "PretrainingOutput",
    "StaticCaptionDecoder",
    "TextEmbeddings",
    "TokenPredictionHead",
    "TransformerDecoder",
    "TransformerEncoder",
    "VisualTokens",
    "count_parameters",
    "generate_captions",
    "gnmt_length_penalty",
    "get_preset",
    "list_presets",
    "make_pretraining_batch",
    "mask_tokens",
    "mismatch_texts",
    "with_static_targets",
    "preset_parameter_counts",
    "token_cross_entropy",
]
