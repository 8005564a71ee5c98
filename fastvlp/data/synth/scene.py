"""Scene model of the synthetic images: a few flat shapes, none overlapping, on a named light tint.

A scene is sampled from a `ScenePlan` so that the VQA generator can choose its answers first (the colour of
the one object of its kind, and how many copies of another kind there are) and the scene is built to match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastvlp.data.synth.palette import BACKGROUND_JITTER, BACKGROUNDS, COLOUR_NAMES, SHAPES, SIZES, TEXTURES

MIN_COUNTED = 1
MAX_COUNTED = 4
# Gap left between the boxes of two objects, so that relations and pixel colours are unambiguous.
_GAP = 3.0
_CIRCLE_POINTS = 32


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape. `box` is the tight (x0, y0, x1, y1) bound of `outline`, in pixels."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]
    outline: tuple[tuple[float, float], ...]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0


@dataclass(frozen=True)
class ScenePlan:
    """What the scene must contain: the colour of the single `named` object, the `counted` copies, and the
    colour of the single `partner` object (drawn with the scene when None)."""

    named_colour: str
    counted: int
    partner_colour: str | None = None

    def __post_init__(self) -> None:
        if self.named_colour not in COLOUR_NAMES:
            raise ValueError(f"named_colour: expected one of {COLOUR_NAMES}, got {self.named_colour!r}")
        if self.partner_colour is not None and self.partner_colour not in COLOUR_NAMES:
            raise ValueError(f"partner_colour: expected None or one of {COLOUR_NAMES}, got {self.partner_colour!r}")
        if not MIN_COUNTED <= self.counted <= MAX_COUNTED:
            raise ValueError(f"counted: expected {MIN_COUNTED}..{MAX_COUNTED}, got {self.counted}")


@dataclass(frozen=True)
class Scene:
    """A full scene. `named_shape` and `partner_shape` occur exactly once; `counted_shape` occurs
    `plan.counted` times; the other objects are of further kinds, each at most once."""

    width: int
    height: int
    background: tuple[int, int, int]
    background_name: str
    texture: str
    texture_period: int
    texture_direction: str
    objects: tuple[ShapeObject, ...]
    named_shape: str
    partner_shape: str
    counted_shape: str

    def of_shape(self, shape: str) -> list[ShapeObject]:
        return [obj for obj in self.objects if obj.shape == shape]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(
            1
            for obj in self.objects
            if (shape is None or obj.shape == shape) and (colour is None or obj.colour == colour)
        )

    def only(self, shape: str) -> ShapeObject:
        found = self.of_shape(shape)
        if len(found) != 1:
            raise ValueError(f"shape: expected exactly one {shape}, the scene has {len(found)}")
        return found[0]


def is_left_of(a: ShapeObject, b: ShapeObject) -> bool:
    """True when `a` lies entirely to the left of `b`."""
    return a.box[2] < b.box[0]


def is_above(a: ShapeObject, b: ShapeObject) -> bool:
    """True when `a` lies entirely above `b`."""
    return a.box[3] < b.box[1]


def shape_outline(shape: str, cx: float, cy: float, side: float) -> tuple[tuple[float, float], ...]:
    """Polygon outline of a shape of nominal side `side` centred at (cx, cy)."""
    half = side / 2.0
    if shape == "square":
        return ((cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half))
    if shape == "triangle":
        return ((cx, cy - half), (cx + half, cy + half), (cx - half, cy + half))
    if shape == "diamond":
        return ((cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy))
    if shape == "circle":
        angles = [2.0 * math.pi * i / _CIRCLE_POINTS for i in range(_CIRCLE_POINTS)]
        return tuple((cx + half * math.cos(a), cy + half * math.sin(a)) for a in angles)
    if shape == "pentagon":
        angles = [-math.pi / 2 + 2.0 * math.pi * i / 5 for i in range(5)]
        return tuple((cx + half * math.cos(a), cy + half * math.sin(a)) for a in angles)
    if shape == "star":
        points = []
        for i in range(10):
            radius = half if i % 2 == 0 else 0.45 * half
            angle = -math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return tuple(points)
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def _bounds(outline: tuple[tuple[float, float], ...]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in outline]
    ys = [p[1] for p in outline]
    return (round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2))


def _size_word(extent: float, short_side: int) -> str:
    """The size word of a shape whose larger extent is ``extent`` pixels in an image of short side
    ``short_side``: one rule over what is drawn, so the words follow from the pixels."""
    ratio = extent / short_side
    if ratio < 0.18:
        return "small"
    return "large" if ratio > 0.255 else "medium"


def _overlaps(box: tuple[float, ...], others: list[tuple[float, ...]]) -> bool:
    return any(
        box[0] < o[2] + _GAP and o[0] < box[2] + _GAP and box[1] < o[3] + _GAP and o[1] < box[3] + _GAP for o in others
    )


def _place(rng: np.random.Generator, kinds: list[tuple[str, str]], width: int, height: int) -> list[ShapeObject]:
    """Rejection-sample non-overlapping positions; shrink everything a little whenever packing fails."""
    short = min(width, height)
    sides = [float(rng.uniform(*SIZES[str(rng.choice(list(SIZES)))])) * short for _ in kinds]
    order = sorted(range(len(kinds)), key=lambda i: -sides[i])  # big ones first pack better
    scale = 1.0
    while True:
        placed: dict[int, ShapeObject] = {}
        boxes: list[tuple[float, ...]] = []
        for i in order:
            side = max(8.0, sides[i] * scale)
            for _ in range(80):
                cx = float(rng.uniform(side / 2 + 1, width - side / 2 - 1))
                cy = float(rng.uniform(side / 2 + 1, height - side / 2 - 1))
                outline = shape_outline(kinds[i][0], cx, cy, side)
                box = _bounds(outline)
                if not _overlaps(box, boxes):
                    break
            else:
                break
            boxes.append(box)
            # The size word follows the drawn extent (a pentagon or star spans a little less than its side).
            extent = max(box[2] - box[0], box[3] - box[1])
            placed[i] = ShapeObject(kinds[i][0], kinds[i][1], _size_word(extent, short), box, outline)
        if len(placed) == len(kinds):
            return [placed[i] for i in range(len(kinds))]
        scale *= 0.85
        if scale < 0.2:
            raise RuntimeError(f"cannot place {len(kinds)} shapes in a {width}x{height} image")


def sample_image_size(rng: np.random.Generator, long_side: tuple[int, int] = (160, 256)) -> tuple[int, int]:
    """(width, height) with the long side in `long_side` and an aspect ratio between 1 and 1.6."""
    long = int(rng.integers(long_side[0], long_side[1] + 1))
    short = int(round(long * float(rng.uniform(0.62, 1.0))))
    return (long, short) if rng.random() < 0.6 else (short, long)


def sample_plan(rng: np.random.Generator) -> ScenePlan:
    """A plan with a uniformly random colour and count."""
    return ScenePlan(str(rng.choice(COLOUR_NAMES)), int(rng.integers(MIN_COUNTED, MAX_COUNTED + 1)))


def sample_scene(rng: np.random.Generator, plan: ScenePlan | None = None) -> Scene:
    """Sample a scene that satisfies `plan` (a random plan when None)."""
    if plan is None:
        plan = sample_plan(rng)
    if not isinstance(plan, ScenePlan):
        raise TypeError(f"plan: expected a ScenePlan, got {type(plan).__name__}")
    width, height = sample_image_size(rng)
    kinds_order = [str(s) for s in rng.permutation(SHAPES)]
    named, partner, counted = kinds_order[:3]
    fillers = kinds_order[3 : 3 + int(rng.integers(0, 3))]

    def colour() -> str:
        return str(rng.choice(COLOUR_NAMES))

    kinds = [(named, plan.named_colour), (partner, plan.partner_colour or colour())]
    kinds += [(counted, colour()) for _ in range(plan.counted)]
    kinds += [(kind, colour()) for kind in fillers]
    objects = _place(rng, kinds, width, height)
    objects = [objects[i] for i in rng.permutation(len(objects))]  # annotation order is not role order

    background_name = str(rng.choice(list(BACKGROUNDS)))
    jitter = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    background = tuple(int(min(255, max(0, c + int(d)))) for c, d in zip(BACKGROUNDS[background_name], jitter))
    return Scene(
        width=width,
        height=height,
        background=background,
        background_name=background_name,
        texture=str(rng.choice(TEXTURES)),
        texture_period=int(rng.integers(7, 14)),
        texture_direction=str(rng.choice(("horizontal", "vertical", "diagonal"))),
        objects=tuple(objects),
        named_shape=named,
        partner_shape=partner,
        counted_shape=counted,
    )
