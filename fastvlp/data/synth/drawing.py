"""Rendering a `Scene` to pixels with PIL's ImageDraw."""

from __future__ import annotations

from PIL import Image, ImageDraw

from fastvlp.data.synth.palette import COLOURS
from fastvlp.data.synth.scene import Scene

# Texture marks are only slightly darker than the background, so they never read as a shape colour.
_TEXTURE_DARKENING = 18


def _draw_texture(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    mark = tuple(max(0, c - _TEXTURE_DARKENING) for c in scene.background)
    w, h, step = scene.width, scene.height, scene.texture_period
    if scene.texture == "striped":
        if scene.texture_direction == "horizontal":
            for y in range(0, h, step):
                draw.line([(0, y), (w, y)], fill=mark)
        elif scene.texture_direction == "vertical":
            for x in range(0, w, step):
                draw.line([(x, 0), (x, h)], fill=mark)
        else:
            for x in range(-h, w, step):
                draw.line([(x, 0), (x + h, h)], fill=mark)
    elif scene.texture == "dotted":
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.rectangle([x, y, x + 1, y + 1], fill=mark)


def render_scene(scene: Scene) -> Image.Image:
    """An RGB image of the scene: background, texture, then the shapes in annotation order."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(list(obj.box), fill=fill)
        else:
            draw.polygon(list(obj.outline), fill=fill)
    return image
