"""Decoding images strictly: a truncated or corrupt file raises, it is never padded with grey."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile

from fastvlp.data.skips import MISSING_IMAGE, UNREADABLE_IMAGE


class UnreadableImageError(ValueError):
    """An image file that is missing or does not decode completely. `reason` is a skips reason."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.reason = path, reason


def load_rgb_image(path: str | Path) -> Image.Image:
    """Decode the whole image at `path` as RGB, raising UnreadableImageError if it is missing or broken.

    Decoding is forced with `load()` inside the try, so truncation is detected here and not later. Raises
    RuntimeError when PIL.ImageFile.LOAD_TRUNCATED_IMAGES has been switched on elsewhere in the process, since
    truncated files would then decode without an error.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some other library switched PIL to padding truncated files; that would hide broken data.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; fastvlp needs it off to detect broken images")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise UnreadableImageError(path, MISSING_IMAGE, "no such file") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(path, UNREADABLE_IMAGE, str(error) or type(error).__name__) from error


def image_problem(path: str | Path) -> str | None:
    """None when the image decodes, otherwise the skip reason (missing_image or unreadable_image)."""
    try:
        load_rgb_image(path)
    except UnreadableImageError as error:
        return error.reason
    return None
