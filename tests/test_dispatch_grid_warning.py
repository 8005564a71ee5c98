"""backend="auto" falls back to the reference past the kernels' launch grid limit: on CUDA it warns once.

The CUDA decision is checked without a GPU by handing the selection the device type "cuda" for CPU
tensors (stride-0 views, so a 65536-row batch costs no memory).
"""
import warnings

import pytest
import torch

from fastvlp.ops.fmha import dispatch

LIMIT = dispatch.MAX_KERNEL_GRID_EXTENT


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_grid_fallback_warned", False)


def q_of(batch, heads, dtype=torch.float16, head_dim=16):
    return torch.zeros(1, 1, 1, 1, dtype=dtype).expand(batch, 3, heads, head_dim)


def select_recording(q, device_type="cuda", backend="auto"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = dispatch._select(q, backend, warn=True, device_type=device_type)
    return choice, [w for w in caught if issubclass(w.category, RuntimeWarning)]


RANDOM_BATCH = int(torch.randint(LIMIT + 1, 4 * LIMIT, (), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("batch,heads", [(LIMIT + 1, 2), (2, LIMIT + 1), (RANDOM_BATCH, 1)])
def test_auto_warns_once_when_the_grid_limit_sends_cuda_to_the_reference(fresh_warning, batch, heads):
    choice, caught = select_recording(q_of(batch, heads))
    assert choice.backend == "reference" and "launch grid limit" in choice.reasons["triton"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"batch {batch} or heads {heads}" in message and "split the batch" in message
    assert "reference" in message and str(LIMIT) in message
    # Once per process.
    choice, caught = select_recording(q_of(batch, heads))
    assert choice.backend == "reference" and caught == []


def test_no_warning_for_other_reasons_devices_or_backends(fresh_warning):
    # Within the limit a CUDA call takes the kernels (where Triton imports).
    choice, caught = select_recording(q_of(LIMIT, LIMIT))
    assert choice.backend == ("triton" if dispatch._triton_available() is None else "reference") and caught == []
    # CPU tensors run the reference under auto anyway.
    choice, caught = select_recording(q_of(LIMIT + 1, 1), device_type="cpu")
    assert choice.backend == "reference" and caught == []
    # float64 goes to the reference for its dtype, whatever the batch: the grid is not the reason.
    choice, caught = select_recording(q_of(LIMIT + 1, 1, dtype=torch.float64))
    assert choice.backend == "reference" and "float64" in choice.reasons["triton"] and caught == []
    # Asking for the reference is not a fallback; asking for Triton raises with the reason.
    choice, caught = select_recording(q_of(LIMIT + 1, 1), backend="reference")
    assert choice.backend == "reference" and caught == []
    with pytest.raises(RuntimeError, match="launch grid limit"):
        dispatch._select(q_of(LIMIT + 1, 1), "triton", device_type="cuda")
    assert dispatch._grid_fallback_warned is False


def test_select_backend_reports_without_warning(fresh_warning):
    q = torch.zeros(1, 1, 1, 1).expand(LIMIT + 1, 2, 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = dispatch.select_backend(q, q, q)
    assert choice.backend == "reference"


@pytest.mark.cuda
def test_attention_warns_once_on_cuda(fresh_warning):
    q = torch.randn(LIMIT + 1, 2, 1, 16, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="split the batch"):
        out = dispatch.attention(q, q, q)
    torch.testing.assert_close(out, dispatch.attention(q, q, q, backend="reference"))
