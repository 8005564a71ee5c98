"""A small caption grammar. Every caption is a true statement about the drawn scene: its colours, shapes,
counts, sizes and left/right/above/below relations all come from the scene's objects, and every caption
names the background's tint."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fastvlp.data.synth.palette import noun, number_word, with_article
from fastvlp.data.synth.scene import Scene, ShapeObject, is_above, is_left_of

CAPTIONS_PER_IMAGE = 5


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if not items:
        raise ValueError("items: expected at least one phrase")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def object_phrase(obj: ShapeObject, with_size: bool = False) -> str:
    """'a red circle' or, with the size, 'a small red circle'."""
    words = f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"
    return with_article(words)


def _group_phrase(count: int, colour: str | None, shape: str) -> str:
    words = f"{colour} {shape}" if colour else shape
    return with_article(words) if count == 1 else f"{number_word(count)} {words[: -len(shape)]}{noun(shape, count)}"


def inventory(scene: Scene) -> str:
    """Every object, grouped by colour and shape: 'two blue squares, a red circle and a green star'."""
    groups = Counter((obj.colour, obj.shape) for obj in scene.objects)
    return join_words([_group_phrase(n, colour, shape) for (colour, shape), n in groups.items()])


def _inventory_caption(rng: np.random.Generator, scene: Scene) -> str:
    forms = (
        "{items} on a {texture} {tint} background",
        "an image of {items} on {tint}",
        "a {texture} {tint} background with {items}",
        "a picture showing {items} on {tint}",
    )
    return forms[int(rng.integers(len(forms)))].format(items=inventory(scene), texture=scene.texture,
                                                       tint=scene.background_name)


def _count_caption(rng: np.random.Generator, scene: Scene) -> str:
    kinds = sorted({obj.shape for obj in scene.objects})
    shape = kinds[int(rng.integers(len(kinds)))]
    n = scene.count(shape)
    others = len(scene.objects) - n
    if others and rng.random() < 0.5:
        return (f"{_group_phrase(n, None, shape)} and {number_word(others)} other {noun('shape', others)} "
                f"on {scene.background_name}")
    verb = "is" if n == 1 else "are"
    return f"there {verb} {_group_phrase(n, None, shape)} on the {scene.background_name} background"


def _total_caption(rng: np.random.Generator, scene: Scene) -> str:
    groups = Counter(obj.shape for obj in scene.objects)
    kinds = join_words([_group_phrase(n, None, shape) for shape, n in groups.items()])
    return f"{number_word(len(scene.objects))} shapes on {scene.background_name}: {kinds}"


def _relation_caption(rng: np.random.Generator, scene: Scene) -> str | None:
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            if is_left_of(a, b):
                pairs += [(a, "to the left of", b), (b, "to the right of", a)]
            if is_above(a, b):
                pairs += [(a, "above", b), (b, "below", a)]
    if not pairs:
        return None
    a, relation, b = pairs[int(rng.integers(len(pairs)))]
    verb = " is" if rng.random() < 0.5 else ""
    return f"{object_phrase(a)}{verb} {relation} {object_phrase(b)} on {scene.background_name}"


def _attribute_caption(rng: np.random.Generator, scene: Scene) -> str | None:
    single = [obj for obj in scene.objects if scene.count(obj.shape) == 1]
    if not single:
        return None
    obj = single[int(rng.integers(len(single)))]
    if rng.random() < 0.5:
        return f"the {obj.shape} on {scene.background_name} is {obj.colour}"
    return f"the {obj.shape} in this {scene.background_name} picture is {obj.size} and {obj.colour}"


def _colour_caption(rng: np.random.Generator, scene: Scene) -> str:
    colours = list(dict.fromkeys(obj.colour for obj in scene.objects))
    return f"{join_words(colours)} shapes on a {scene.texture} {scene.background_name} background"


def _sized_caption(rng: np.random.Generator, scene: Scene) -> str:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    others = len(scene.objects) - 1
    return (f"{object_phrase(obj, with_size=True)} and {number_word(others)} other {noun('shape', others)} "
            f"on {scene.background_name}")


CAPTION_TEMPLATES = {
    "inventory": _inventory_caption,
    "count": _count_caption,
    "total": _total_caption,
    "relation": _relation_caption,
    "attribute": _attribute_caption,
    "colour": _colour_caption,
    "sized": _sized_caption,
}
_TEMPLATES = tuple(CAPTION_TEMPLATES.values())


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption_from_template(name: str, rng: np.random.Generator, scene: Scene) -> str | None:
    """One true caption of `scene` in the form of template `name` (a key of CAPTION_TEMPLATES), as a
    sentence; None when the scene has nothing that template can say (no relation or single object)."""
    if name not in CAPTION_TEMPLATES:
        raise ValueError(f"name: expected one of {tuple(CAPTION_TEMPLATES)}, got {name!r}")
    text = CAPTION_TEMPLATES[name](rng, scene)
    return None if text is None else _sentence(text)


def describe_scene(rng: np.random.Generator, scene: Scene, num_captions: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`num_captions` distinct true captions of the scene, drawn from varied templates."""
    if num_captions < 1:
        raise ValueError(f"num_captions: expected >= 1, got {num_captions}")
    captions: list[str] = []
    for attempt in range(40 * num_captions):
        if attempt % len(_TEMPLATES) == 0:
            order = rng.permutation(len(_TEMPLATES))
        text = _TEMPLATES[order[attempt % len(_TEMPLATES)]](rng, scene)
        if text is not None and _sentence(text) not in captions:
            captions.append(_sentence(text))
            if len(captions) == num_captions:
                return captions
    # Scenes too plain for that many distinct sentences repeat the first ones.
    return [captions[i % len(captions)] for i in range(num_captions)]
