"""NLVR2 files (one JSON object a line) and image pairs for the synthetic scenes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvlp.data.synth.drawing import render_scene
from fastvlp.data.synth.files import save_image, write_json_lines
from fastvlp.data.synth.scene import Scene
from fastvlp.data.synth.statements import make_statement

NLVR2_SPLITS = ("train", "dev", "test1")
SENTENCES_PER_PAIR = 2
PAIRS_PER_SET = 4
_NUM_WRITERS = 40


@dataclass(frozen=True)
class ScenePair:
    split: str
    set_id: int
    pair_id: int
    left: Scene
    right: Scene

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.set_id}-{self.pair_id}"


def write_nlvr2(root: Path, pairs: list[ScenePair], seed: int) -> dict[str, int]:
    """Write `root`/{train,dev,test1}.json and `root`/images/<split>/<stem>-img{0,1}.png.
    Labels are dealt from a balanced deck per split, so half of them are true. Returns rows per split."""
    counts = {}
    for split_index, split in enumerate(NLVR2_SPLITS):
        subset = [pair for pair in pairs if pair.split == split]
        # Its own stream (10): [seed, 4, i] are the scene streams of the pairs (generate.py).
        rng = np.random.default_rng([seed, 10, split_index])
        total = len(subset) * SENTENCES_PER_PAIR
        labels = [i % 2 == 0 for i in range(total)]
        labels = [labels[i] for i in rng.permutation(total)]
        rows = []
        for p, pair in enumerate(subset):
            folder = root / "images" / split
            save_image(render_scene(pair.left), folder / f"{pair.stem}-img0.png")
            save_image(render_scene(pair.right), folder / f"{pair.stem}-img1.png")
            for sentence_id in range(SENTENCES_PER_PAIR):
                label = labels[p * SENTENCES_PER_PAIR + sentence_id]
                text_label = "True" if label else "False"
                writer = str(int(rng.integers(_NUM_WRITERS)))
                row = {
                    "validation": {str(int(rng.integers(_NUM_WRITERS))): text_label},
                    "sentence": make_statement(rng, pair.left, pair.right, label),
                    "left_url": f"images/{split}/{pair.stem}-img0.png",
                    "writer": writer,
                    "label": text_label,
                    "right_url": f"images/{split}/{pair.stem}-img1.png",
                    "synset": pair.left.objects[0].shape,
                    "query": f"{pair.left.objects[0].shape} shapes{pair.set_id}",
                    "identifier": f"{pair.stem}-{sentence_id}",
                }
                if split != "train":
                    row["extra_validations"] = {str(int(rng.integers(_NUM_WRITERS))): text_label for _ in range(4)}
                rows.append(row)
        write_json_lines(root / f"{split}.json", rows)
        counts[split] = len(rows)
    return counts
