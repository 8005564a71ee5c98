"""The detection label space: named classes, one index each, plus a no-object index after them.

In pre-training it is Visual Genome's object vocabulary (objects_vocab.txt, one class a line, optional
comma-separated alternative names), or one built from the training annotations; COCO's categories are
mapped into it by normalised name, and those without a match are appended. Attributes use the same class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence


def normalise_name(name: str) -> str:
    """Lower case, surrounding space removed, inner runs of white space made single spaces."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    return " ".join(name.lower().split())


class LabelSpace:
    """Classes in a fixed order. `index(name)` accepts any of a class's names, normalised; the no-object
    class (DETR's) is `no_object_index == num_classes`, so a classifier head has `num_classes + 1` outputs."""

    def __init__(self, classes: Sequence[str | Sequence[str]]) -> None:
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise TypeError("classes: expected a sequence of names (or of name lists), got " + type(classes).__name__)
        self._names: list[tuple[str, ...]] = []
        self._index: dict[str, int] = {}
        for position, entry in enumerate(classes):
            names = [entry] if isinstance(entry, str) else list(entry)
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"classes[{position}]: expected non-empty names, got {entry!r}")
            normalised = tuple(dict.fromkeys(normalise_name(n) for n in names))
            for name in normalised:
                # A name listed twice keeps its first class, so that a vocabulary file's line numbers stay
                # the class indices even if the file repeats itself.
                self._index.setdefault(name, len(self._names))
            self._names.append(normalised)

    # Construction --------------------------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: str | Path) -> LabelSpace:
        """One class a line; alternative names of a class separated by commas; blank lines ignored."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([[part for part in line.split(",") if part.strip()] for line in lines if line.strip()])

    @classmethod
    def from_names(cls, names: Iterable[str], min_count: int = 1, max_classes: int | None = None) -> LabelSpace:
        """Classes from observed names (e.g. every object name of the training annotations), most frequent
        first (ties alphabetical), keeping those seen at least `min_count` times, at most `max_classes`."""
        if isinstance(names, str):
            raise TypeError("names: expected an iterable of names, got a single str")
        if min_count < 1:
            raise ValueError(f"min_count: expected >= 1, got {min_count}")
        if max_classes is not None and max_classes < 1:
            raise ValueError(f"max_classes: expected >= 1 or None, got {max_classes}")
        counts = Counter(normalise_name(name) for name in names if isinstance(name, str) and name.strip())
        ranked = sorted((item for item in counts.items() if item[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
        return cls([name for name, _ in ranked[:max_classes]])

    def save(self, path: str | Path) -> None:
        """Write the vocabulary file that `from_vocab_file` reads back."""
        Path(path).write_text("".join(",".join(names) + "\n" for names in self._names), encoding="utf-8")

    load = from_vocab_file

    # Lookup --------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._names)

    @property
    def no_object_index(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        """The first (canonical) name of each class, in index order."""
        return [names[0] for names in self._names]

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def get(self, name: str) -> int | None:
        """The index of `name`, else of `name` without a plural 's', else None."""
        key = normalise_name(name)
        if key in self._index:
            return self._index[key]
        if key.endswith("s") and key[:-1] in self._index:
            return self._index[key[:-1]]
        return None

    def index(self, name: str) -> int:
        found = self.get(name)
        if found is None:
            raise KeyError(f"name: {name!r} is not in the label space")
        return found

    def name(self, index: int) -> str:
        if not 0 <= index < len(self._names):
            raise IndexError(f"index: expected 0..{len(self._names) - 1}, got {index}")
        return self._names[index][0]

    def extended(self, names: Iterable[str]) -> LabelSpace:
        """A new label space with the names that do not match a class appended, in order."""
        entries: list[Sequence[str]] = list(self._names)
        added = set()
        for name in names:
            key = normalise_name(name)
            if self.get(key) is None and key not in added:
                entries.append([key])
                added.add(key)
        return LabelSpace(entries)

    def with_coco_categories(self, categories: Iterable) -> tuple[LabelSpace, dict[int, int]]:
        """Map COCO categories (Category records or {'id', 'name'} dicts) into this label space by name.

        Returns the label space with the unmatched categories appended, and category id -> class index.
        """
        pairs = []
        for category in categories:
            if isinstance(category, dict):
                category_id, name = category.get("id"), category.get("name")
            else:
                category_id, name = getattr(category, "id", None), getattr(category, "name", None)
            if not isinstance(category_id, int) or not isinstance(name, str):
                raise ValueError(f"categories: expected items with an int 'id' and a str 'name', got {category!r}")
            pairs.append((category_id, name))
        space = self.extended(name for _, name in pairs)
        return space, {category_id: space.index(name) for category_id, name in pairs}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and self._names == other._names

    def __repr__(self) -> str:
        return f"LabelSpace({self.num_classes} classes + no-object)"
