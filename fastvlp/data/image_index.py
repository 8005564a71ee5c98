"""Finding image files by the annotation's own file name, or by its numeric image id.

The index walks the given folders once, so every layout works: ours (coco/images/train/000000000009.jpg),
the published one (coco/train2014/COCO_train2014_000000000009.jpg), Visual Genome's VG_100K and
VG_100K_2, or NLVR2's numbered train sub-folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The id is the run of digits that ends the file stem: '000000000009', 'COCO_train2014_000000000009', '1'.
_ID_PATTERN = re.compile(r"(?:^|_)(\d+)$")


def image_id_from_name(file_name: str) -> int | None:
    """The numeric id in a file name like COCO_val2014_000000000042.jpg or 2345.jpg, else None."""
    match = _ID_PATTERN.search(PurePosixPath(file_name).stem)
    return int(match.group(1)) if match else None


class ImageIndex:
    """All image files under some folders, looked up by file name or by id."""

    def __init__(self, directories: list[str | Path]) -> None:
        if isinstance(directories, (str, Path)):
            raise TypeError("directories: expected a list of folders, got a single path")
        self._by_name: dict[str, list[Path]] = {}
        self._by_id: dict[int, list[Path]] = {}
        self._folders: dict[Path, tuple[str, ...]] = {}  # image path -> its folders below the indexed root
        for directory in directories:
            if not isinstance(directory, (str, Path)):
                raise TypeError(f"directories: expected str or Path items, got {type(directory).__name__}")
            visited: set[str] = set()
            # Symbolic links are followed (data sets are often linked in), each real folder once.
            for folder, subfolders, files in os.walk(directory, followlinks=True):
                real = os.path.realpath(folder)
                if real in visited:
                    subfolders[:] = []
                    continue
                visited.add(real)
                subfolders.sort()
                below = Path(folder).relative_to(directory).parts
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        path = Path(folder) / name
                        self._folders[path] = below
                        self._by_name.setdefault(name, []).append(path)
                        image_id = image_id_from_name(name)
                        if image_id is not None:
                            self._by_id.setdefault(image_id, []).append(path)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self._by_name.values())

    def _choose(self, paths: list[Path], hint: str | None) -> Path:
        if len(paths) > 1 and hint:
            for path in paths:
                if any(hint in part for part in self._folders[path]):
                    return path
        return paths[0]

    def find(self, file_name: str | None = None, image_id: int | None = None, hint: str | None = None) -> Path | None:
        """The file called `file_name` (any folder; a URL or relative path counts by its last part), else the
        file whose name ends with `image_id`. `hint` (a split name) prefers, when several files match, one with
        a folder below the indexed root whose name contains it. None when nothing matches."""
        if file_name:
            paths = self._by_name.get(PurePosixPath(str(file_name).replace("\\", "/")).name)
            if paths:
                return self._choose(paths, hint)
        if image_id is not None:
            paths = self._by_id.get(int(image_id))
            if paths:
                return self._choose(paths, hint)
        return None
