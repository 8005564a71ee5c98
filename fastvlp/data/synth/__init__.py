"""The embedded synthetic data set: simple shape scenes written in the published formats of COCO, Visual
Genome, VQA v2, NLVR2 and Flickr30k, with captions, answers and labels that follow from the pixels."""

from fastvlp.data.synth.cli import build_parser, main, run
from fastvlp.data.synth.generate import DATASETS, write_synthetic_dataset

__all__ = ["DATASETS", "build_parser", "main", "run", "write_synthetic_dataset"]
