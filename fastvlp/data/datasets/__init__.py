"""Torch datasets over the readers' records: images decoded lazily, unreadable ones skipped and counted."""

from fastvlp.data.datasets.batching import collate_samples
from fastvlp.data.datasets.image_records import ImageRecordDataset
from fastvlp.data.datasets.nlvr2 import Nlvr2Dataset
from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.data.datasets.vqa import NUM_ANSWERS, SOFT_SCORES, VqaDataset, build_answer_vocabulary, soft_scores

__all__ = [
    "NUM_ANSWERS",
    "SOFT_SCORES",
    "ImageRecordDataset",
    "Nlvr2Dataset",
    "SkippedSample",
    "VqaDataset",
    "build_answer_vocabulary",
    "collate_samples",
    "soft_scores",
]
