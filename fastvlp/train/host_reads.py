"""Find what in a piece of PyTorch code would, on a GPU, stop the host until the device catches up or copy host
data to the device: what keeps a training step out of a CUDA graph. It runs on any device, the CPU included, so
a test without a GPU can show that a step is free of them.

Recorded: reading a tensor's values on the host (``item``, ``bool``/``int``/``float`` of a tensor, ``tolist``,
``numpy``), operations whose output shape depends on the data (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), and tensors built from Python data
(``torch.tensor``/``as_tensor`` of a list: a copy from pageable host memory on a GPU).
"""
from __future__ import annotations

import traceback
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {
    "aten._local_scalar_dense": "reads a value on the host",
    "aten.nonzero": "output shape depends on the data",
    "aten.masked_select": "output shape depends on the data",
    "aten._unique2": "output shape depends on the data",
    "aten.unique_dim": "output shape depends on the data",
    "aten.unique_consecutive": "output shape depends on the data",
    "aten.lift_fresh": "builds a tensor from host data",
    "aten.equal": "reads a value on the host",
    "aten.is_nonzero": "reads a value on the host",
}


def _where() -> str:
    """The innermost frame outside torch and this module: the line of the caller's code responsible."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("host_reads.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


class HostReadRecorder(TorchDispatchMode):
    """Context manager recording each host read as ``"<operation>: <why> at <file:line (function)>"`` in
    ``records``; the code inside runs unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[str] = []
        self._patched = {}

    def _record(self, name: str, why: str) -> None:
        self.records.append(f"{name}: {why} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        why = _DATA_DEPENDENT.get(name)
        if why is None and name == "aten.index" and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] if len(args) > 1 else ())
                if index is not None):
            why = "boolean indexing: output shape depends on the data"
        if why is None and name == "aten.repeat_interleave" and kwargs.get("output_size") is None \
                and isinstance(args[0], torch.Tensor) and len(args) < 3:
            why = "output shape depends on the data (no output_size)"
        if why is not None:
            self._record(name, why)
        return func(*args, **kwargs)

    def __enter__(self):
        # On the CPU these read memory directly, without an operation the dispatcher sees.
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def recording(tensor, *args, _original=original, _method=method, **kwargs):
                self._record(f"Tensor.{_method}", "reads values on the host")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, recording)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        self._patched.clear()
        return super().__exit__(*exc)
