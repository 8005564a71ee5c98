"""Builds the compiled extension fastvlp._C with CMake (Ninja when available).

Metadata lives in pyproject.toml; this file only adds the CMake build step.

Environment variables:
  FASTVLP_DISABLE_CUDA=1      skip the CUDA sources even when nvcc is found
  FASTVLP_CUDA_ARCHS="80;90"  CUDA architectures (default: 80, 90, and 90a when nvcc supports it)
  FASTVLP_BUILD_TYPE=Debug    CMake build type (default Release)
  FASTVLP_NATIVE=1            compile with -march=native (the result may not run on other CPUs)
  CUDA_HOME                   toolkit location; otherwise nvcc is looked up on PATH
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    """Path of nvcc from CUDA_HOME (or CUDA_PATH), else from PATH; None if absent or disabled."""
    if _env_flag("FASTVLP_DISABLE_CUDA"):
        return None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = Path(home) / "bin" / "nvcc"
            if candidate.is_file():
                return str(candidate)
    return shutil.which("nvcc")


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _cuda_archs(nvcc):
    """The architectures to compile for, as CMake-list numbers such as "80;90;90a"."""
    requested = os.environ.get("FASTVLP_CUDA_ARCHS", "").strip()
    if requested:
        archs = [a.strip().replace("sm_", "").replace("compute_", "") for a in re.split(r"[;, ]+", requested)]
        return ";".join(a for a in archs if a)
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
        supported = set(re.findall(r"compute_(\d+)", listed))
    except (subprocess.CalledProcessError, OSError):
        supported = None  # old nvcc without --list-gpu-arch: assume 80 and 90 exist
    archs = [a for a in ("80", "90") if supported is None or a in supported]
    if "90" in archs and _nvcc_version(nvcc) >= (12, 0):
        archs.append("90a")  # Hopper-specific instructions (wgmma, setmaxnreg)
    if not archs:
        raise RuntimeError(f"{nvcc} supports neither sm_80 nor sm_90; set FASTVLP_CUDA_ARCHS")
    return ";".join(archs)


def _tool(module_name, attribute, executable):
    """A build tool from its pip package (build isolation), else from PATH."""
    try:
        module = __import__(module_name)
        path = Path(getattr(module, attribute)) / executable
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    return shutil.which(executable)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("CMake is required to build fastvlp (pip install cmake)")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("FASTVLP_BUILD_TYPE", "Debug" if self.debug else "Release")

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTVLP_NATIVE={'ON' if _env_flag('FASTVLP_NATIVE') else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _find_nvcc()
        if nvcc:
            archs = _cuda_archs(nvcc)
            args += ["-DFASTVLP_ENABLE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DFASTVLP_CUDA_ARCHS={archs}"]
            print(f"fastvlp: CUDA sources use {nvcc} for {archs}")
        else:
            args += ["-DFASTVLP_ENABLE_CUDA=OFF"]
            print("fastvlp: building without CUDA (no nvcc found, or FASTVLP_DISABLE_CUDA is set)")

        build_dir = Path(self.build_temp).resolve() / ext.name
        self._reset_if_configured_differently(build_dir, [cmake] + args)
        build = [cmake, "--build", ".", "--config", build_type]
        if not ninja:
            build += ["--parallel", str(os.cpu_count() or 1)]
        try:
            subprocess.run([cmake, str(ROOT)] + args, cwd=build_dir, check=True)
            subprocess.run(build, cwd=build_dir, check=True)
        except subprocess.CalledProcessError as error:
            hint = " (set FASTVLP_DISABLE_CUDA=1 to build without the CUDA solver)" if nvcc else ""
            raise RuntimeError(f"building fastvlp._C failed: {error}{hint}") from error

    @staticmethod
    def _reset_if_configured_differently(build_dir, configuration):
        # An in-tree build directory outlives isolated build environments, and
        # CMake's cache would keep pointing at their deleted tools.
        stamp = build_dir / "fastvlp-configuration.json"
        if build_dir.exists():
            try:
                previous = json.loads(stamp.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != configuration:
                shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(configuration))


setup(ext_modules=[CMakeExtension("fastvlp._C")], cmdclass={"build_ext": CMakeBuild})
