"""Lets Triton's CPU interpreter before 3.7 run the kernels under NumPy 2.4 and later.

Those interpreters turn a tensor used as a loop bound into an int with ``int(array)``. A reduction such as
the kernels' key range gives a one-element array of shape ``(1,)``, which NumPy 2.4 no longer converts
("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7 squeezes the array first;
:func:`squeeze_loop_bounds` gives older interpreters the same conversion. Compiled kernels are unaffected.
"""
from __future__ import annotations

import re

import triton

_MARK = "_fastvlp_squeezes_loop_bounds"


def _version(text: str) -> tuple:
    numbers = re.match(r"(\d+)\.(\d+)", text)
    return (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)


def needs_squeezed_loop_bounds(triton_version: str = triton.__version__) -> bool:
    """Whether this Triton's interpreter converts loop bounds without squeezing them (before 3.7)."""
    return _version(triton_version) < (3, 7)


def squeeze_loop_bounds() -> bool:
    """Make the interpreter's tensor-to-int conversion squeeze one-element arrays, as Triton 3.7 does.
    Returns whether the interpreter is (now) patched; a no-op on Triton 3.7 and later, or where the
    interpreter lacks the function that sets the conversion."""
    if not needs_squeezed_loop_bounds():
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return False
    if getattr(patch_tensor, _MARK, False):
        return True

    def patch_tensor_with_squeezed_index(tensor, scope):
        patch_tensor(tensor, scope)
        # Set after Triton's own, so the scope restores both in order when the kernel returns.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    setattr(patch_tensor_with_squeezed_index, _MARK, True)
    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index
    return True
