"""Triton's CPU interpreter before 3.7 with NumPy 2.4+: loop bounds taken from reductions."""
import types

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastvlp.ops.fmha import interpreter_compat  # noqa: E402
from fastvlp.ops.fmha.kernel_config import INTERPRETED  # noqa: E402


@pytest.mark.parametrize(
    "version, needed",
    [("3.5.1", True), ("3.6.0", True), ("3.6.0+git1234", True), ("3.7.0", False), ("3.7.1", False),
     ("3.8.0", False), ("4.0.0", False)],
)
def test_only_interpreters_before_3_7_need_the_fix(version, needed):
    assert interpreter_compat.needs_squeezed_loop_bounds(version) is needed


def test_the_patch_adds_a_squeezing_conversion_after_tritons_own(monkeypatch):
    """On any Triton: the replacement calls Triton's own patch, then sets an __index__ that converts the
    one-element arrays reductions give, and the scope restores both in reverse order."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    calls = []

    def tritons_own(tensor, scope):
        calls.append(tensor)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", tritons_own)
    monkeypatch.setattr(interpreter_compat, "needs_squeezed_loop_bounds", lambda: True)
    assert interpreter_compat.squeeze_loop_bounds() is True
    patched = interpreter._patch_lang_tensor
    assert patched is not tritons_own
    assert interpreter_compat.squeeze_loop_bounds() is True and interpreter._patch_lang_tensor is patched  # once

    class FakeTensor:
        def __init__(self, data):
            self.handle = types.SimpleNamespace(data=data)

    class Scope:
        def __init__(self):
            self.changes = []

        def set_attr(self, obj, name, value):
            self.changes.append((name, getattr(obj, name, None)))
            setattr(obj, name, value)

    scope = Scope()
    patched(FakeTensor, scope)
    assert calls == [FakeTensor] and [name for name, _ in scope.changes] == ["__index__", "__index__"]
    assert range(10)[FakeTensor(np.array([7], dtype=np.int32))] == 7
    assert range(10)[FakeTensor(np.array(3, dtype=np.int32))] == 3


def test_no_patch_on_triton_3_7_and_later(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    before = getattr(interpreter, "_patch_lang_tensor", None)
    monkeypatch.setattr(interpreter_compat, "needs_squeezed_loop_bounds", lambda: False)
    assert interpreter_compat.squeeze_loop_bounds() is False
    assert getattr(interpreter, "_patch_lang_tensor", None) is before


@triton.jit
def _count_steps_from_first_positive(x_ptr, out_ptr, length, BLOCK: tl.constexpr, STEP: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < length, other=0)
    first = tl.min(tl.where(x > 0, offsets, length), 0)  # a reduction, as the kernels' key range
    steps = 0
    for _ in range(first, length, STEP):
        steps += 1
    tl.store(out_ptr, steps)


@pytest.mark.skipif(not INTERPRETED, reason="runs Triton's CPU interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("first_positive", [0, 3, 6, 8])
def test_a_loop_bound_from_a_reduction_runs_in_the_interpreter(first_positive):
    """The pattern of the attention kernels' key-range loops, on whatever Triton is installed."""
    length, block, step = 8, 8, 3
    x = torch.zeros(length, dtype=torch.int32)
    x[first_positive:] = torch.randint(1, 9, (length - first_positive,), dtype=torch.int32)
    out = torch.full((1,), -1, dtype=torch.int32)
    _count_steps_from_first_positive[(1,)](x, out, length, BLOCK=block, STEP=step)
    assert out.item() == len(range(first_positive, length, step))
