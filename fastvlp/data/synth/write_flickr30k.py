"""Flickr30k in the Karpathy split format, for the synthetic images."""

from __future__ import annotations

from pathlib import Path

from fastvlp.data.synth.drawing import render_scene
from fastvlp.data.synth.files import save_image, write_json
from fastvlp.data.synth.synth_image import SynthImage
from fastvlp.data.synth.write_coco import karpathy_file


def write_flickr30k(root: Path, images: list[SynthImage]) -> dict[str, int]:
    """Write `root`/images/*.jpg and `root`/dataset_flickr30k.json. Returns image counts per split."""
    for image in images:
        save_image(render_scene(image.scene), root / "images" / image.file_name)
    write_json(root / "dataset_flickr30k.json", karpathy_file(images, "flickr30k"))
    counts: dict[str, int] = {}
    for image in images:
        counts[image.karpathy_split] = counts.get(image.karpathy_split, 0) + 1
    return counts
