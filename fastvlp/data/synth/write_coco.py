"""COCO captions, COCO instances and the Karpathy split file, for the synthetic images."""

from __future__ import annotations

from pathlib import Path

from fastvlp.data.synth.drawing import render_scene
from fastvlp.data.synth.files import karpathy_tokens, save_image, write_json
from fastvlp.data.synth.synth_image import SynthImage, polygon_area

# Deliberately not contiguous, as COCO's own category ids are not.
CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 4, "diamond": 5, "pentagon": 7, "star": 9}
COCO_FOLDERS = ("train", "val")
_INFO = {"description": "fastvlp synthetic shapes", "version": "1.0", "year": 2014}


def _image_entry(image: SynthImage) -> dict:
    return {
        "id": image.image_id,
        "file_name": image.file_name,
        "width": image.scene.width,
        "height": image.scene.height,
        "license": 1,
    }


def _instances(images: list[SynthImage], first_id: int) -> list[dict]:
    annotations, next_id = [], first_id
    for image in images:
        for obj in image.scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    "id": next_id,
                    "image_id": image.image_id,
                    "category_id": CATEGORY_IDS[obj.shape],
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(polygon_area(list(obj.outline)), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(v, 2) for point in obj.outline for v in point]],
                }
            )
            next_id += 1
    return annotations


def write_coco(root: Path, images: list[SynthImage]) -> dict[str, int]:
    """Write `root`/images/{train,val}, `root`/annotations/{captions,instances}_{train,val}.json and
    `root`/dataset_coco.json. Returns the number of images per folder."""
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in CATEGORY_IDS.items()]
    licenses = [{"id": 1, "name": "synthetic", "url": ""}]
    counts, caption_id, object_id = {}, 1, 1
    for folder in COCO_FOLDERS:
        subset = [image for image in images if image.folder == folder]
        counts[folder] = len(subset)
        for image in subset:
            save_image(render_scene(image.scene), root / "images" / folder / image.file_name)
        captions = []
        for image in subset:
            for caption in image.captions:
                captions.append({"id": caption_id, "image_id": image.image_id, "caption": caption})
                caption_id += 1
        entries = [_image_entry(image) for image in subset]
        base = {"info": _INFO, "licenses": licenses, "images": entries}
        write_json(root / "annotations" / f"captions_{folder}.json", {**base, "annotations": captions})
        instances = _instances(subset, object_id)
        object_id += len(instances)
        write_json(
            root / "annotations" / f"instances_{folder}.json",
            {**base, "annotations": instances, "categories": categories},
        )
    write_json(root / "dataset_coco.json", karpathy_file(images, "coco"))
    return counts


def karpathy_file(images: list[SynthImage], dataset: str) -> dict:
    """The Karpathy split format: one entry per image with its split and tokenised sentences."""
    entries, sentence_id = [], 0
    for index, image in enumerate(images):
        sentences = []
        for caption in image.captions:
            sentences.append(
                {"tokens": karpathy_tokens(caption), "raw": caption, "imgid": index, "sentid": sentence_id}
            )
            sentence_id += 1
        entry = {
            "sentids": [s["sentid"] for s in sentences],
            "imgid": index,
            "sentences": sentences,
            "split": image.karpathy_split,
            "filename": image.file_name,
        }
        if dataset == "coco":
            entry = {"filepath": image.folder, **entry, "cocoid": image.image_id}
        entries.append(entry)
    return {"images": entries, "dataset": dataset}
