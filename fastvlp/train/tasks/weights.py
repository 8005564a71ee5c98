"""Loading a checkpoint's weights into a task model, with a report of what was new and what went unused."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open
from safetensors.torch import load_file

WEIGHTS = "model.safetensors"


@dataclass
class KeyLoadReport:
    """``new``: model keys the checkpoint did not have (they keep their fresh initialisation);
    ``unused``: checkpoint keys the model has no place for; ``mismatched``: keys present in both with
    different shapes (left at their initialisation);
    ``rows_from_pretraining``: what a task model took from a pre-training checkpoint beyond whole tensors
    (the detection model: the names of the categories whose classifier rows it copied)."""

    loaded: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    rows_from_pretraining: List[str] = field(default_factory=list)

    @staticmethod
    def _by_module(keys: List[str]) -> Dict[str, int]:
        return dict(sorted(Counter(".".join(k.split(".")[:2]) for k in keys).items()))

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for name in ("new", "unused", "mismatched"):
            keys = getattr(self, name)
            if keys:
                modules = ", ".join(f"{m} ({n})" for m, n in self._by_module(keys).items())
                parts.append(f"{len(keys)} {name}: {modules}")
        if self.rows_from_pretraining:
            parts.append(f"classifier rows from pre-training for {len(self.rows_from_pretraining)} categories")
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, object]:
        return {"loaded": len(self.loaded), "new": self.new, "unused": self.unused, "mismatched": self.mismatched,
                "rows_from_pretraining": self.rows_from_pretraining}


def _storage_groups(model: torch.nn.Module) -> Dict[str, List[str]]:
    """Key -> every key sharing its storage (tied weights are saved once)."""
    by_pointer: Dict[int, List[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_pointer.setdefault(tensor.data_ptr(), []).append(key)
    return {key: keys for keys in by_pointer.values() for key in keys}


def load_task_weights(model: torch.nn.Module, checkpoint: Path, prefix: str = "vlp.") -> KeyLoadReport:
    """Load ``checkpoint/model.safetensors`` into ``model`` non-strictly. Keys of a pre-training checkpoint
    (an E2EVLP's) get ``prefix``, and the parts the model re-initialises (``model.fresh_parts``, e.g. a
    new detection classifier) are not taken from it, though a model with ``initialise_from_pretraining``
    may then copy what carries over (rows of a classifier, by class name); a task checkpoint's keys
    (already prefixed) load as they are."""
    path = Path(checkpoint) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {WEIGHTS} in {checkpoint}")
    stored = load_file(str(path))
    # safetensors saves tied weights once and records each dropped name -> the kept name in the metadata;
    # restore the dropped names, since the kept one may belong to a part this model does not have.
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    for dropped, kept in metadata.items():
        if kept in stored and dropped not in stored:
            stored[dropped] = stored[kept]
    pretraining = not any(key.startswith(prefix) for key in stored)
    if pretraining:
        stored = {prefix + key: value for key, value in stored.items()}
    fresh = tuple(f"{prefix}{part}." for part in getattr(model, "fresh_parts", ())) if pretraining else ()
    own = model.state_dict()
    report = KeyLoadReport()
    usable = {}
    for key, value in stored.items():
        if key not in own or (fresh and key.startswith(fresh)):
            report.unused.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(key)
        else:
            usable[key] = value
    model.load_state_dict(usable, strict=False)
    groups = _storage_groups(model)
    loaded = {k for key in usable for k in groups.get(key, [key])}
    report.loaded = sorted(loaded)
    report.new = sorted(key for key in own if key not in loaded and key not in report.mismatched)
    if pretraining and hasattr(model, "initialise_from_pretraining"):
        report.rows_from_pretraining = list(model.initialise_from_pretraining(Path(checkpoint), stored))
    return report
