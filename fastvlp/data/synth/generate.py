"""`write_synthetic_dataset`: the whole synthetic data set, in the layout and formats of the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastvlp.data.synth.captions import describe_scene
from fastvlp.data.synth.questions import plan_questions
from fastvlp.data.synth.scene import sample_scene
from fastvlp.data.synth.splits import assign_splits
from fastvlp.data.synth.synth_image import SynthImage
from fastvlp.data.synth.write_coco import write_coco
from fastvlp.data.synth.write_flickr30k import write_flickr30k
from fastvlp.data.synth.write_nlvr2 import ScenePair, write_nlvr2
from fastvlp.data.synth.write_visual_genome import write_visual_genome
from fastvlp.data.synth.write_vqa import write_vqa

DATASETS = ("coco", "vqa", "vg", "flickr30k", "nlvr2")
# Every random stream is seeded by (seed, stream, index), so each image depends only on its own index.
_COCO, _VG, _FLICKR, _NLVR2, _PLANS, _SPLITS, _IDS = 1, 2, 3, 4, 6, 8, 9
_NLVR2_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test1", "restval": "train"}


def coco_images(num_images: int, seed: int):
    """The coco images of `write_synthetic_dataset(num_images=num_images, seed=seed)`, with their scenes and
    captions, without rendering or writing anything; and the VQA answer plan of each image id."""
    ids = np.random.default_rng([seed, _IDS, _COCO]).choice(600_000, size=num_images, replace=False) + 1
    splits = assign_splits(np.random.default_rng([seed, _SPLITS, _COCO]), num_images, with_restval=True)
    # VQA's splits are the image folders, so the answers are balanced within each folder.
    folders = ["train" if split == "train" else "val" for split in splits]
    plans = plan_questions(np.random.default_rng([seed, _PLANS]), folders)
    images = []
    for i, image_id in enumerate(sorted(int(v) for v in ids)):
        rng = np.random.default_rng([seed, _COCO, i])
        scene = sample_scene(rng, plans[i].scene)
        folder = folders[i]
        images.append(
            SynthImage(image_id, f"{image_id:012d}.jpg", folder, splits[i], scene, tuple(describe_scene(rng, scene)))
        )
    return images, {image.image_id: plan for image, plan in zip(images, plans)}


def _plain_images(num_images: int, seed: int, stream: int, ids: list[int], splits: list[str]) -> list[SynthImage]:
    images = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, stream, i])
        scene = sample_scene(rng)
        images.append(SynthImage(ids[i], f"{ids[i]}.jpg", "", splits[i], scene, tuple(describe_scene(rng, scene))))
    return images


def _nlvr2_pairs(num_pairs: int, seed: int) -> list[ScenePair]:
    splits = [_NLVR2_SPLIT_NAMES[s] for s in assign_splits(np.random.default_rng([seed, _SPLITS, _NLVR2]), num_pairs)]
    position = {"train": 0, "dev": 0, "test1": 0}
    pairs = []
    for i in range(num_pairs):
        rng = np.random.default_rng([seed, _NLVR2, i])
        p = position[splits[i]]
        position[splits[i]] += 1
        pairs.append(ScenePair(splits[i], p // 4, p % 4, sample_scene(rng), sample_scene(rng)))
    return pairs


def write_synthetic_dataset(
    out_dir: str | Path, num_images: int = 1000, seed: int = 0, datasets: tuple[str, ...] = DATASETS
) -> dict[str, dict[str, int]]:
    """Write the synthetic data set under `out_dir` (coco/, vqa/, vg/, flickr30k/, nlvr2/).

    `num_images` images are drawn for each of coco, vg and flickr30k, and `num_images` image pairs for
    nlvr2; vqa asks questions about the coco images. The bytes written depend only on `num_images`,
    `seed` and `datasets`. Returns, per data set, the counts its writer reports.
    """
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir: expected a str or Path, got {type(out_dir).__name__}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    unknown = set(datasets) - set(DATASETS)
    if unknown or not datasets:
        raise ValueError(f"datasets: expected a non-empty subset of {DATASETS}, got {tuple(datasets)}")
    if "vqa" in datasets and "coco" not in datasets:
        raise ValueError("datasets: 'vqa' asks about the coco images, so it needs 'coco' too")

    out = Path(out_dir)
    summary: dict[str, dict[str, int]] = {}
    if "coco" in datasets:
        images, plans = coco_images(num_images, seed)
        summary["coco"] = write_coco(out / "coco", images)
        if "vqa" in datasets:
            summary["vqa"] = write_vqa(out / "vqa", images, plans, seed)
    if "vg" in datasets:
        images = _plain_images(num_images, seed, _VG, list(range(1, num_images + 1)), ["train"] * num_images)
        summary["vg"] = write_visual_genome(out / "vg", images, seed)
    if "flickr30k" in datasets:
        id_rng = np.random.default_rng([seed, _IDS, _FLICKR])
        ids = sorted(int(v) + 1_000_000_000 for v in id_rng.choice(900_000_000, size=num_images, replace=False))
        splits = assign_splits(np.random.default_rng([seed, _SPLITS, _FLICKR]), num_images)
        summary["flickr30k"] = write_flickr30k(out / "flickr30k", _plain_images(num_images, seed, _FLICKR, ids, splits))
    if "nlvr2" in datasets:
        summary["nlvr2"] = write_nlvr2(out / "nlvr2", _nlvr2_pairs(num_images, seed), seed)
    return summary
