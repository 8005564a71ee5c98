"""Readers of the published data sets. Each returns a ReadResult: the records it could read and a
SkipCounter of those it left out, per reason."""

from fastvlp.data.readers.coco import coco_annotation_file, read_coco_captions, read_coco_instances
from fastvlp.data.readers.karpathy import KARPATHY_SPLITS, read_coco_karpathy, read_flickr30k, read_karpathy_file
from fastvlp.data.readers.nlvr2 import read_nlvr2
from fastvlp.data.readers.visual_genome import read_visual_genome
from fastvlp.data.readers.vqa import read_vqa

__all__ = [
    "KARPATHY_SPLITS",
    "coco_annotation_file",
    "read_coco_captions",
    "read_coco_instances",
    "read_coco_karpathy",
    "read_flickr30k",
    "read_karpathy_file",
    "read_nlvr2",
    "read_visual_genome",
    "read_vqa",
]
