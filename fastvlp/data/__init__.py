"""fastvlp's data layer: readers of the published data sets, the label space, transforms, batching with
pixel masks, the WordPiece tokenizer, torch datasets, and the embedded synthetic data set."""

from fastvlp.data.collate import NestedTensor, nested_tensor_from_images
from fastvlp.data.datasets import (
    ImageRecordDataset,
    Nlvr2Dataset,
    SkippedSample,
    VqaDataset,
    build_answer_vocabulary,
    collate_samples,
    soft_scores,
)
from fastvlp.data.exclusion import ExcludedImages, filter_excluded, read_excluded_images
from fastvlp.data.image_index import ImageIndex
from fastvlp.data.images import UnreadableImageError, load_rgb_image
from fastvlp.data.label_space import LabelSpace, normalise_name
from fastvlp.data.pretraining import read_pretraining_images
from fastvlp.data.readers import (
    read_coco_captions,
    read_coco_instances,
    read_coco_karpathy,
    read_flickr30k,
    read_karpathy_file,
    read_nlvr2,
    read_visual_genome,
    read_vqa,
)
from fastvlp.data.records import Category, ImageRecord, Nlvr2Record, ObjectAnnotation, VqaRecord
from fastvlp.data.skips import ReadResult, SkipCounter
from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.data.tokenizer import EncodedText, WordPieceTokenizer
from fastvlp.data.transforms import (
    SCALE_PRESETS,
    ImageTransform,
    ScaleConfig,
    TransformedImage,
    eval_transform,
    swap_left_right,
    train_transform,
)

__all__ = [
    "SCALE_PRESETS",
    "Category",
    "EncodedText",
    "ExcludedImages",
    "ImageIndex",
    "ImageRecord",
    "ImageRecordDataset",
    "ImageTransform",
    "LabelSpace",
    "NestedTensor",
    "Nlvr2Dataset",
    "Nlvr2Record",
    "ObjectAnnotation",
    "ReadResult",
    "ScaleConfig",
    "SkipCounter",
    "SkippedSample",
    "TransformedImage",
    "UnreadableImageError",
    "VqaDataset",
    "VqaRecord",
    "WordPieceTokenizer",
    "build_answer_vocabulary",
    "collate_samples",
    "eval_transform",
    "filter_excluded",
    "load_rgb_image",
    "nested_tensor_from_images",
    "normalise_name",
    "read_coco_captions",
    "read_coco_instances",
    "read_coco_karpathy",
    "read_excluded_images",
    "read_flickr30k",
    "read_karpathy_file",
    "read_nlvr2",
    "read_pretraining_images",
    "read_visual_genome",
    "read_vqa",
    "soft_scores",
    "swap_left_right",
    "train_transform",
    "write_synthetic_dataset",
]
