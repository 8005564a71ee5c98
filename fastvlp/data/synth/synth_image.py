"""One generated image with everything the writers need to annotate it."""

from __future__ import annotations

from dataclasses import dataclass

from fastvlp.data.synth.scene import Scene


@dataclass(frozen=True)
class SynthImage:
    image_id: int
    file_name: str
    folder: str  # sub-folder of the images directory ('' when the layout has none)
    karpathy_split: str  # 'train', 'val', 'test' or 'restval'
    scene: Scene
    captions: tuple[str, ...]


def polygon_area(points) -> float:
    """Shoelace area of a simple polygon."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        total += x0 * y1 - x1 * y0
    return abs(total) / 2.0
