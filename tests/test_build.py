"""The compiled extension fastvlp._C: it imports and reports how it was built."""
import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import pytest

_C = pytest.importorskip("fastvlp._C", reason="fastvlp._C is not built (pip install -e . --no-build-isolation)")

BUILD_INFO_TYPES = {
    "cuda": bool,
    "cuda_archs": list,
    "cxx_compiler": str,
    "cuda_compiler": (str, type(None)),
    "cuda_runtime_version": (str, type(None)),
    "pybind11_version": str,
    "build_type": str,
}


def _nvcc_visible():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return True
    return shutil.which("nvcc") is not None


def test_build_info_keys_and_types():
    info = _C.build_info()
    assert set(info) == set(BUILD_INFO_TYPES)
    for key, expected in BUILD_INFO_TYPES.items():
        assert isinstance(info[key], expected), f"{key}: {info[key]!r}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["pybind11_version"])
    assert re.search(r"\d+\.\d+", info["cxx_compiler"])
    assert info["build_type"] in ("Release", "Debug", "RelWithDebInfo", "MinSizeRel")


def test_cuda_fields_agree_with_the_cuda_flag():
    info = _C.build_info()
    if info["cuda"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"sm_\d+a?", arch) for arch in info["cuda_archs"])
        assert re.search(r"\d+\.\d+", info["cuda_compiler"])
        assert re.match(r"\d+\.\d+", info["cuda_runtime_version"])
        assert hasattr(_C, "lsap_cuda") and hasattr(_C, "lsap_cuda_workspace_bytes")
    else:
        assert info["cuda_archs"] == []
        assert info["cuda_compiler"] is None and info["cuda_runtime_version"] is None
        assert not hasattr(_C, "lsap_cuda")


@pytest.mark.skipif(not _nvcc_visible(), reason="no nvcc on PATH or in CUDA_HOME")
@pytest.mark.skipif(
    os.environ.get("FASTVLP_DISABLE_CUDA", "").strip().lower() in ("1", "true", "yes", "on"),
    reason="FASTVLP_DISABLE_CUDA is set",
)
def test_cuda_sources_are_built_when_nvcc_is_available():
    assert _C.build_info()["cuda"] is True


def test_cpu_solver_builds_can_be_listed_and_selected():
    isas = _C.lsap_cpu_isas()
    assert isas[0] == "baseline" and set(isas) <= {"baseline", "avx2"}
    assert _C.lsap_cpu_isa() == isas[-1]  # "auto" picks the best build
    try:
        for isa in isas:
            _C.set_lsap_cpu_isa(isa)
            assert _C.lsap_cpu_isa() == isa
    finally:
        _C.set_lsap_cpu_isa("auto")
    with pytest.raises(ValueError, match="cpu isa"):
        _C.set_lsap_cpu_isa("sse9")


def test_installed_metadata():
    try:
        distribution = importlib.metadata.distribution("fastvlp")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastvlp is not installed (running from a source tree)")
    assert distribution.version == "0.1.0"
    scripts = {entry.name: entry.value for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert scripts.get("fastvlp") == "fastvlp.cli:main"
    requirements = " ".join(distribution.requires or [])
    for name in ("torch", "numpy", "scipy", "safetensors", "tokenizers", "torchvision"):
        assert name in requirements
