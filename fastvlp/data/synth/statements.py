"""NLVR2-style statements about a pair of scenes, with the label chosen first.

Each template proposes a sentence and evaluates it on the (left, right) pair; `make_statement` keeps
proposing until the evaluated truth equals the requested label, so every label is correct by construction.
"""

from __future__ import annotations

import numpy as np

from fastvlp.data.synth.palette import COLOUR_NAMES, SHAPES, noun, number_word, with_article
from fastvlp.data.synth.scene import Scene, is_left_of

_SIDES = ("left", "right")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _some_pair(rng: np.random.Generator, left: Scene, right: Scene) -> tuple[str, str]:
    """A (colour, shape) seen in one of the images half the time, a random one otherwise."""
    if rng.random() < 0.5:
        obj = _pick(rng, _pick(rng, (left, right)).objects)
        return obj.colour, obj.shape
    return _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)


def _exact_count(rng, left, right):
    side = _pick(rng, _SIDES)
    scene = left if side == "left" else right
    shape = _pick(rng, SHAPES)
    actual = scene.count(shape)
    n = actual if rng.random() < 0.5 else int(rng.integers(0, 5))
    return f"The {side} image contains exactly {number_word(n)} {noun(shape, n)}.", n == actual


def _both_contain(rng, left, right):
    colour, shape = _some_pair(rng, left, right)
    truth = left.count(shape, colour) > 0 and right.count(shape, colour) > 0
    return f"Both images contain {with_article(f'{colour} {shape}')}.", truth


def _only_one_contains(rng, left, right):
    colour, shape = _some_pair(rng, left, right)
    truth = (left.count(shape, colour) > 0) != (right.count(shape, colour) > 0)
    phrase = with_article(f"{colour} {shape}")
    return f"One image contains {phrase} and the other image does not.", truth


def _more_than(rng, left, right):
    side = _pick(rng, _SIDES)
    other = "right" if side == "left" else "left"
    shape = _pick(rng, SHAPES)
    counts = {"left": left.count(shape), "right": right.count(shape)}
    return f"The {side} image has more {noun(shape, 2)} than the {other} image.", counts[side] > counts[other]


def _each_at_least(rng, left, right):
    n = int(rng.integers(3, 8))
    truth = min(len(left.objects), len(right.objects)) >= n
    return f"Each image contains at least {number_word(n)} shapes.", truth


def _total(rng, left, right):
    shape = _pick(rng, SHAPES)
    actual = left.count(shape) + right.count(shape)
    n = actual if rng.random() < 0.5 else int(rng.integers(0, 7))
    return f"There are exactly {number_word(n)} {noun(shape, n)} in the two images combined.", n == actual


def _left_of(rng, left, right):
    side = _pick(rng, _SIDES)
    scene = left if side == "left" else right
    i, j = (int(v) for v in rng.choice(len(scene.objects), size=2, replace=False))
    a, b = scene.objects[i], scene.objects[j]
    truth = any(
        is_left_of(x, y)
        for x in scene.objects
        for y in scene.objects
        if (x.colour, x.shape) == (a.colour, a.shape) and (y.colour, y.shape) == (b.colour, b.shape)
    )
    first, second = with_article(f"{a.colour} {a.shape}"), with_article(f"{b.colour} {b.shape}")
    return f"In the {side} image, {first} is to the left of {second}.", truth


_TEMPLATES = (_exact_count, _both_contain, _only_one_contains, _more_than, _each_at_least, _total, _left_of)


def make_statement(rng: np.random.Generator, left: Scene, right: Scene, label: bool) -> str:
    """A sentence about the pair whose truth value is `label`."""
    if not isinstance(label, bool):
        raise TypeError(f"label: expected a bool, got {type(label).__name__}")
    for _ in range(200):
        sentence, truth = _pick(rng, _TEMPLATES)(rng, left, right)
        if truth == label:
            return sentence
    # A count statement can always be made true or false.
    shape = left.objects[0].shape
    n = left.count(shape) + (0 if label else 1)
    return f"The left image contains exactly {number_word(n)} {noun(shape, n)}."
