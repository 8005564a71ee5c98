"""Deterministic file writing for the synthetic data (same input, same bytes)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

JPEG_QUALITY = 90


def write_json(path: Path, content) -> None:
    """Compact JSON, as the published annotation files are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, separators=(",", ":")), encoding="utf-8")


def write_json_lines(path: Path, rows: list[dict]) -> None:
    """One JSON object a line (NLVR2's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def save_image(image: Image.Image, path: Path) -> None:
    """JPEG or PNG by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, "JPEG", quality=JPEG_QUALITY)
    elif path.suffix.lower() == ".png":
        image.save(path, "PNG")
    else:
        raise ValueError(f"path: expected a .jpg or .png file name, got {path.name!r}")


def karpathy_tokens(sentence: str) -> list[str]:
    """Lower-case word tokens without punctuation, as in the Karpathy split files."""
    return "".join(c if c.isalnum() else " " for c in sentence.lower()).split()
