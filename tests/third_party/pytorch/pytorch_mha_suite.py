"""PyTorch's own ``nn.MultiheadAttention`` tests, run against ``fastvlp.nn.MultiheadAttention``.

The torch wheel does not ship PyTorch's test suite, so the upstream file
``test/nn/test_multihead_attention.py`` is looked for at ``$FASTVLP_PYTORCH_MHA_TESTS``, else at
``upstream/test_multihead_attention.py`` beside this file; take it from the PyTorch release that
matches the installed torch, and keep PyTorch's BSD-style ``LICENSE`` with any copy of it. Without it
this module is skipped.

The upstream file is used unmodified. What this module changes:

* ``torch.nn.MultiheadAttention`` is replaced by fastvlp's class while the upstream module is imported
  (which binds its ``from torch.nn import MultiheadAttention``) and while each test runs (which covers
  its ``torch.nn.MultiheadAttention(...)`` and ``nn.MultiheadAttention(...)`` calls);
* the tests listed in ``SKIPPED`` are skipped, each with its reason: they test torch internals or
  modules other than ``MultiheadAttention``, not the public behaviour of the module under test.

Importing ``torch.testing._internal`` changes global torch state (it freezes ``torch.backends`` flags
and reseeds the RNG), so ``test_pytorch_mha_suite.py`` runs this module in its own pytest process.
Run it directly with ``pytest tests/third_party/pytorch/pytorch_mha_suite.py``.
"""
import importlib.util
import os
import unittest
from pathlib import Path

import pytest
import torch

from fastvlp.nn.multihead_attention import MultiheadAttention

# Kept in step with test_pytorch_mha_suite.py, which must find the file without importing this module.
UPSTREAM_ENV = "FASTVLP_PYTORCH_MHA_TESTS"
UPSTREAM_DEFAULT = Path(__file__).with_name("upstream") / "test_multihead_attention.py"

SKIPPED = {
    "test_multihead_self_attn_two_masks_fast_path_mock": (
        "mocks torch._native_multi_head_attention to prove torch's internal inference kernel was called; "
        "fastvlp's fast path is its own op (parity with masks is covered by "
        "test_multihead_self_attn_two_masks_fast_path)"
    ),
    "test_multihead_attn_nested_tensor_outside_fast_path": (
        "feeds nested (jagged) tensors, which torch handles only through its internal inference kernel; "
        "fastvlp's module rejects nested tensors and takes key_padding_mask instead"
    ),
    "test_fast_path_check_with_mask_does_not_break_in_compile": (
        "tests torch.nn.TransformerEncoder, which builds torch's own MultiheadAttention, not the module "
        "under test"
    ),
}


def upstream_path() -> Path:
    return Path(os.environ.get(UPSTREAM_ENV) or UPSTREAM_DEFAULT)


def _load_upstream(path: Path):
    spec = importlib.util.spec_from_file_location("pytorch_test_multihead_attention", path)
    module = importlib.util.module_from_spec(spec)
    original = torch.nn.MultiheadAttention
    torch.nn.MultiheadAttention = MultiheadAttention
    try:
        spec.loader.exec_module(module)
    finally:
        torch.nn.MultiheadAttention = original
    return module


def _skip_listed_tests(test_class) -> None:
    for name in list(vars(test_class)):
        for skipped, reason in SKIPPED.items():
            # Generated names append device and dtype: test_x_cpu, test_x_cuda_float64, ...
            if name == skipped or name.startswith(skipped + "_"):
                setattr(test_class, name, unittest.skip(reason)(getattr(test_class, name)))


if not upstream_path().is_file():
    pytest.skip(
        f"PyTorch's test/nn/test_multihead_attention.py not found at {upstream_path()} (set {UPSTREAM_ENV})",
        allow_module_level=True,
    )
pytest.importorskip("expecttest", reason="torch.testing._internal needs the expecttest package")

_upstream = _load_upstream(upstream_path())
for _name, _value in vars(_upstream).items():
    if _name.startswith("Test") and isinstance(_value, type) and issubclass(_value, unittest.TestCase):
        _skip_listed_tests(_value)
        globals()[_name] = _value
del _name, _value  # pytest would collect the loop variable as a second copy of the last class


@pytest.fixture(autouse=True)
def _module_under_test(monkeypatch):
    monkeypatch.setattr(torch.nn, "MultiheadAttention", MultiheadAttention)
    yield


def test_module_under_test_is_fastvlps():
    assert _upstream.MultiheadAttention is MultiheadAttention
    assert torch.nn.MultiheadAttention is MultiheadAttention
    assert torch.nn.modules.activation.MultiheadAttention is not MultiheadAttention  # torch's own is untouched
