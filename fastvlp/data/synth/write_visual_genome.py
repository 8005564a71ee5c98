"""Visual Genome 1.4 files (image data, objects, attributes, region descriptions, vocabularies) for the
synthetic images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fastvlp.data.synth.captions import object_phrase
from fastvlp.data.synth.drawing import render_scene
from fastvlp.data.synth.files import save_image, write_json, write_lines
from fastvlp.data.synth.palette import COLOUR_NAMES, SHAPES, SIZE_NAMES
from fastvlp.data.synth.synth_image import SynthImage

# Real Visual Genome annotates attributes on only some objects.
ATTRIBUTE_PROBABILITY = 0.75


def _xywh(box: tuple[float, float, float, float]) -> dict:
    x, y = math.floor(box[0]), math.floor(box[1])
    return {"x": x, "y": y, "w": math.ceil(box[2]) - x, "h": math.ceil(box[3]) - y}


def write_visual_genome(root: Path, images: list[SynthImage], seed: int) -> dict[str, int]:
    """Write `root`/images/*.jpg, image_data.json, objects.json, attributes.json, region_descriptions.json,
    objects_vocab.txt and attributes_vocab.txt. Returns counts of images, objects and attributed objects."""
    image_data, objects, attributes, regions = [], [], [], []
    object_id, region_id, attributed = 1, 1, 0
    for image in images:
        save_image(render_scene(image.scene), root / "images" / image.file_name)
        rng = np.random.default_rng([seed, 7, image.image_id])
        image_data.append(
            {
                "image_id": image.image_id,
                "url": f"images/{image.file_name}",
                "width": image.scene.width,
                "height": image.scene.height,
                "coco_id": None,
                "flickr_id": None,
            }
        )
        image_objects, image_attributes, image_regions = [], [], []
        for obj in image.scene.objects:
            entry = {
                "object_id": object_id,
                **_xywh(obj.box),
                "names": [obj.shape],
                "synsets": [f"{obj.shape}.n.01"],
                "merged_object_ids": [],
            }
            image_objects.append(entry)
            with_attributes = dict(entry)
            if rng.random() < ATTRIBUTE_PROBABILITY:
                words = [obj.colour] + ([obj.size] if obj.size != "medium" and rng.random() < 0.5 else [])
                with_attributes["attributes"] = words
                attributed += 1
            image_attributes.append(with_attributes)
            box = _xywh(obj.box)
            image_regions.append(
                {
                    "region_id": region_id,
                    "image_id": image.image_id,
                    "phrase": object_phrase(obj, with_size=bool(rng.random() < 0.5)),
                    "x": box["x"],
                    "y": box["y"],
                    "width": box["w"],
                    "height": box["h"],
                }
            )
            object_id += 1
            region_id += 1
        for caption in image.captions[:2]:
            image_regions.append(
                {
                    "region_id": region_id,
                    "image_id": image.image_id,
                    "phrase": caption.rstrip(".").lower(),
                    "x": 0,
                    "y": 0,
                    "width": image.scene.width,
                    "height": image.scene.height,
                }
            )
            region_id += 1
        objects.append({"image_id": image.image_id, "objects": image_objects, "image_url": f"images/{image.file_name}"})
        attributes.append({"image_id": image.image_id, "attributes": image_attributes})
        regions.append({"id": image.image_id, "regions": image_regions})
    write_json(root / "image_data.json", image_data)
    write_json(root / "objects.json", objects)
    write_json(root / "attributes.json", attributes)
    write_json(root / "region_descriptions.json", regions)
    write_lines(root / "objects_vocab.txt", list(SHAPES))
    write_lines(root / "attributes_vocab.txt", list(COLOUR_NAMES) + list(SIZE_NAMES))
    return {"images": len(images), "objects": object_id - 1, "attributed_objects": attributed}
