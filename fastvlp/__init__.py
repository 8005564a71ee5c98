"""fastvlp: fast end-to-end vision-language pre-training (E2E-VLP) kernels, modules and model."""
from __future__ import annotations

from typing import Any, Dict

__version__ = "0.1.0"


def build_info() -> Dict[str, Any]:
    """How the native extension was built.

    Keys: ``extension`` (whether ``fastvlp._C`` imports), ``cuda`` (whether the CUDA
    solver was compiled), ``cuda_archs`` (e.g. ``["sm_80", "sm_90", "sm_90a"]``), and the
    compilers and versions used.
    """
    from fastvlp._extension import load_extension

    extension = load_extension()
    if extension is None:
        return {"extension": False, "cuda": False, "cuda_archs": []}
    info = dict(extension.build_info())
    info["extension"] = True
    return info
