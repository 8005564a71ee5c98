"""Access to the compiled extension ``fastvlp._C``, with a clear error where it was not built."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_import_error: Optional[BaseException] = None


def load_extension() -> Optional[ModuleType]:
    """Return ``fastvlp._C``, or None when the package was installed without it."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module("fastvlp._C")
        except ImportError as error:  # a source checkout that was never built
            _import_error = error
    return _module


def require_extension() -> ModuleType:
    module = load_extension()
    if module is None:
        raise RuntimeError(
            "fastvlp._C is not built: install the package with `pip install .` "
            f"(or `pip install -e . --no-build-isolation`); import failed with: {_import_error}"
        )
    return module


def cuda_solver_available() -> bool:
    module = load_extension()
    return module is not None and hasattr(module, "lsap_cuda")
