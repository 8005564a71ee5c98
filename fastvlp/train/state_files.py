"""Nested state dicts (optimizer, RNG) as safetensors + JSON: tensors go to a flat safetensors file, the rest
to a JSON skeleton that points at them, so that loading never unpickles anything."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"


def _flatten(value: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = prefix or "value"
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        # JSON keys are strings: remember int keys (optimizer state is keyed by parameter index).
        items = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"state: keys must be str or int, got {key!r}")
            tag = f"i:{key}" if isinstance(key, int) else f"s:{key}"
            items[tag] = _flatten(item, f"{prefix}.{key}" if prefix else str(key), tensors)
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_flatten(item, f"{prefix}.{i}", tensors) for i, item in enumerate(value)], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state: cannot store a {type(value).__name__} at {prefix!r} without pickling")


def _unflatten(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if "__dict__" in value:
            return {(int(tag[2:]) if tag.startswith("i:") else tag[2:]): _unflatten(item, tensors) for tag, item in value["__dict__"].items()}
        if "__list__" in value:
            items = [_unflatten(item, tensors) for item in value["__list__"]]
            return tuple(items) if value.get("tuple") else items
        raise ValueError(f"state: unexpected JSON object {sorted(value)}")
    return value


def save_state(state: Dict[str, Any], directory: Path, name: str) -> None:
    """Write ``state`` as ``name.safetensors`` (its tensors) and ``name.json`` (everything else)."""
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(skeleton, indent=1, allow_nan=True), encoding="utf-8")


def load_state(directory: Path, name: str) -> Dict[str, Any]:
    """Inverse of :func:`save_state`."""
    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"))
    skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return _unflatten(skeleton, tensors)
