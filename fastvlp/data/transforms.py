"""Image transforms with boxes carried along: DETR's scale augmentation (short side drawn from a set, long
side capped), optional horizontal flip, ImageNet normalisation, boxes out as normalised (cx, cy, w, h)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_SHORT_SIDES = tuple(range(480, 801, 32))
# Small enough for a CPU pre-training step of the tiny model in about half a second at batch 8.
TINY_SHORT_SIDES = (96, 112, 128)


@dataclass(frozen=True)
class ScaleConfig:
    """Training short sides, the long-side cap and the evaluation short side."""

    short_sides: tuple[int, ...] = PAPER_SHORT_SIDES
    max_size: int = 1333
    eval_short_side: int = 800

    def __post_init__(self) -> None:
        if not self.short_sides or any(not isinstance(s, int) or s < 1 for s in self.short_sides):
            raise ValueError(f"short_sides: expected positive ints, got {self.short_sides!r}")
        if not isinstance(self.max_size, int) or self.max_size < max(self.short_sides):
            raise ValueError(f"max_size: expected an int >= the largest short side, got {self.max_size!r}")
        if not isinstance(self.eval_short_side, int) or not 1 <= self.eval_short_side <= self.max_size:
            raise ValueError(f"eval_short_side: expected an int in 1..max_size, got {self.eval_short_side!r}")


SCALE_PRESETS = {
    "paper": ScaleConfig(),
    "tiny": ScaleConfig(short_sides=TINY_SHORT_SIDES, max_size=160, eval_short_side=112),
}


@dataclass
class TransformedImage:
    image: torch.Tensor  # [3, H, W] float32, normalised
    boxes: torch.Tensor  # [N, 4] float32 (cx, cy, w, h) divided by (W, H, W, H)
    size: tuple[int, int]  # (H, W) after resizing
    original_size: tuple[int, int]  # (H, W) before
    flipped: bool


def resized_size(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """(H, W) with the short side `short_side`, scaled down further if the long side would pass `max_size`."""
    if min(height, width) < 1:
        raise ValueError(f"height, width: expected positive sizes, got {height}x{width}")
    scale = short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def xyxy_to_normalised_cxcywh(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    out = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return out / torch.tensor([width, height, width, height], dtype=out.dtype, device=out.device)


# The words and their compounds ("leftmost", "rightwards", "lefthand"), never words that merely contain them.
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|wards?|hand(?:ed)?)?\b", re.IGNORECASE)
# "left" and "right" name a side after these words ("the left", "to its right", "turn left") ...
_SIDE_BEFORE = frozenset("""
    the a an its his her their my your our this that to on at from toward towards far upper lower top bottom
    front back rear turn turns turned turning facing faces face looking looks look pointing points point
    heading heads head leaning leans lean moving moves move going goes go veer veers veering
""".split())
# ... or before these ("left of", "right side", "left-hand", "right corner") ...
_SIDE_AFTER = frozenset("""
    of side sides hand handed corner corners edge edges half arm arms leg legs foot feet eye eyes ear ears
    wing wings lane lanes turn turns field bank column panel page shoulder knee wrist
""".split())
# ... but never in these ("right angle", "right side up") ...
_NEVER_A_SIDE = re.compile(r"\s*(angled?|angles|side\s+up)\b", re.IGNORECASE)
# ... and, unless a determiner or preposition comes first ("to the right behind"), not as an intensifier
# ("right next to", "right behind") or after "all". Nor as the verb or the remainder ("the man left", "one
# slice left"), which no rule above matches: a flip changes nothing there.
_INTENSIFIED = re.compile(r"\s*(next|now|away|here|there|after|before|behind|beside|by|into|through|"
                          r"in\s+front|on\s+top)\b", re.IGNORECASE)
_SIDE_DETERMINERS = frozenset("the a an its his her their my your our to on at from toward towards".split())
_WORD = re.compile(r"[A-Za-z]+")


def _names_a_side(text: str, match: re.Match) -> bool:
    if match.group(2):  # leftmost, rightward(s), lefthand(ed): always a side
        return True
    if _NEVER_A_SIDE.match(text, match.end()):
        return False
    before = [word.lower() for word in _WORD.findall(text[: match.start()])]
    after = [word.lower() for word in _WORD.findall(text[match.end():])]
    previous = before[-1] if before else ""
    if previous not in _SIDE_DETERMINERS and (previous == "all" or _INTENSIFIED.match(text, match.end())):
        return False
    # "left and right", "right or left": both name sides
    paired = (after[:1] in (["and"], ["or"]) and after[1:2] in (["left"], ["right"])) or (
        previous in ("and", "or") and before[-2:-1] in (["left"], ["right"]))
    return paired or previous in _SIDE_BEFORE or (bool(after) and after[0] in _SIDE_AFTER)


def swap_left_right(text: str) -> str:
    """'left' <-> 'right' where the word names a side, for text that goes with a flipped image: after a
    determiner, a possessive, a preposition or a verb of direction ("to the left of", "on his right", "turn
    left"), before a part or place ("left hand", "right corner", "left of"), and always inside 'leftmost',
    'leftward(s)' and 'lefthand(ed)'; not in "right next to", "right angle", "all right", nor where 'left' is
    a verb or the remainder ("the man left", "one slice left"). The case is kept: all capitals, a capital
    first letter, or lower case. A rule over neighbouring words, not a parser: rare phrasings can escape it."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")

    def swap(match: re.Match) -> str:
        original = match.group(0)
        if not _names_a_side(text, match):
            return original
        swapped = ("right" if match.group(1).lower() == "left" else "left") + original[len(match.group(1)):].lower()
        if original.isupper():
            return swapped.upper()
        return swapped.capitalize() if original[0].isupper() else swapped

    return _LEFT_RIGHT.sub(swap, text)


class ImageTransform:
    """Resize (short side drawn uniformly from `short_sides`), optionally flip, normalise; boxes follow.

    Call with a PIL image (or a uint8 [3, H, W] tensor) and optional boxes [N, 4] as absolute (x0, y0, x1, y1)
    pixels of the input; boxes are clipped to the image. Randomness comes from torch's generator
    (`generator`, else the global one), so DataLoader worker seeding applies.
    """

    def __init__(
        self,
        short_sides: Sequence[int],
        max_size: int | None,
        horizontal_flip: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        short_sides = tuple(short_sides)
        if not short_sides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in short_sides):
            raise ValueError(f"short_sides: expected positive ints, got {short_sides!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"max_size: expected a positive int or None, got {max_size!r}")
        self.short_sides, self.max_size, self.horizontal_flip = short_sides, max_size, bool(horizontal_flip)
        self.mean, self.std = list(mean), list(std)

    def __call__(
        self, image, boxes: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> TransformedImage:
        if isinstance(image, Image.Image):
            pixels = F.pil_to_tensor(image.convert("RGB"))
        elif (
            isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.uint8
        ):
            pixels = image
        else:
            raise TypeError("image: expected a PIL image or a uint8 tensor [3, H, W]")
        height, width = pixels.shape[-2:]
        if boxes is None:
            boxes = torch.zeros(0, 4)
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"boxes: expected a tensor [N, 4] of (x0, y0, x1, y1), got {getattr(boxes, 'shape', boxes)}"
            )
        boxes = boxes.to(torch.float32)
        if not bool(torch.isfinite(boxes).all()) or bool((boxes[:, 2:] < boxes[:, :2]).any()):
            raise ValueError("boxes: expected finite (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")

        pick = int(torch.randint(len(self.short_sides), (1,), generator=generator))
        new_h, new_w = resized_size(height, width, self.short_sides[pick], self.max_size)
        pixels = F.resize(pixels, [new_h, new_w], antialias=True)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        boxes = boxes * scale
        boxes = torch.stack(
            [
                boxes[:, 0].clamp(0, new_w),
                boxes[:, 1].clamp(0, new_h),
                boxes[:, 2].clamp(0, new_w),
                boxes[:, 3].clamp(0, new_h),
            ],
            dim=1,
        )

        flipped = self.horizontal_flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            pixels = F.horizontal_flip(pixels)
            boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)

        tensor = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), self.mean, self.std)
        return TransformedImage(
            tensor, xyxy_to_normalised_cxcywh(boxes, new_h, new_w), (new_h, new_w), (height, width), flipped
        )


def train_transform(config: ScaleConfig | str = "paper", horizontal_flip: bool = False) -> ImageTransform:
    """Scale augmentation of `config` (a ScaleConfig or a preset name: 'paper', 'tiny'). Flips are off by
    default because captions speak of left and right; with flips on, pass the text through
    `swap_left_right` when `flipped` is True."""
    config = _config(config)
    return ImageTransform(config.short_sides, config.max_size, horizontal_flip=horizontal_flip)


def eval_transform(config: ScaleConfig | str = "paper") -> ImageTransform:
    """A fixed short side (`config.eval_short_side`) under the same long-side cap, no flip."""
    config = _config(config)
    return ImageTransform((config.eval_short_side,), config.max_size)


def _config(config: ScaleConfig | str, name: str = "config") -> ScaleConfig:
    if isinstance(config, ScaleConfig):
        return config
    if isinstance(config, str) and config in SCALE_PRESETS:
        return SCALE_PRESETS[config]
    raise ValueError(f"{name}: expected a ScaleConfig or one of {sorted(SCALE_PRESETS)}, got {config!r}")


def scale_config(scale: ScaleConfig | str) -> ScaleConfig:
    """The ScaleConfig of `scale` (a ScaleConfig or a preset name)."""
    return _config(scale, "scale")


def check_scale(scale: ScaleConfig | str, name: str = "scale") -> None:
    """Raise ValueError naming `name` unless `scale` is a ScaleConfig or the name of one."""
    _config(scale, name)


def default_scale(preset: str | None) -> str:
    """The scale a model preset trains at: `tiny` for the tiny preset, the paper's for the others (and when
    the preset is unknown)."""
    return "tiny" if preset == "tiny" else "paper"


def scale_record(scale: ScaleConfig | str) -> str | dict[str, Any]:
    """`scale` as JSON: a scale name as is, a ScaleConfig as its fields (the short sides as a list, as JSON
    reads them back, so that records compare equal before and after a round trip)."""
    check_scale(scale)
    return scale if isinstance(scale, str) else {**asdict(scale), "short_sides": list(scale.short_sides)}


def scale_from_record(record: Any, source: str) -> ScaleConfig | str:
    """The scale a :func:`scale_record` wrote; ValueError naming `source` (the file it came from) otherwise."""
    if isinstance(record, str) and record in SCALE_PRESETS:
        return record
    if isinstance(record, Mapping) and set(record) == {entry.name for entry in fields(ScaleConfig)}:
        try:
            return ScaleConfig(**{**record, "short_sides": tuple(record["short_sides"])})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: 'scale' holds an invalid ScaleConfig ({error})") from None
    raise ValueError(f"{source}: 'scale' must be one of {sorted(SCALE_PRESETS)} or the fields of ScaleConfig, "
                     f"got {record!r}")
