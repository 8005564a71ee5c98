"""What every benchmark shares: the device's name, library versions, timing, and result files."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

DEFAULT_RESULTS_DIR = Path("bench") / "results"
_VERSIONED_PACKAGES = (
    "fastvlp", "torch", "triton", "torchvision", "numpy", "scipy", "lapx", "lapjv",
    "torch-linear-assignment", "torch-lap-cuda", "xformers", "flash-attn", "transformers",
)


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Optional[str] = None) -> str:
    """The GPU's (for a CUDA device) or CPU's model name, lower case with dashes: the
    folder name under ``bench/results/``."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> Dict[str, str]:
    """Versions of Python, the CUDA runtime and every library a benchmark may time."""
    found = {"python": platform.python_version(), "cuda": torch.version.cuda or "none"}
    for package in _VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    try:
        import fastvlp

        if found.get("fastvlp") == "missing":  # run from a source tree on the path, not installed
            found["fastvlp"] = f"{fastvlp.__version__} (source tree, not installed)"
        found["fastvlp_build"] = json.dumps(fastvlp.build_info(), sort_keys=True)
    except Exception as error:  # the benchmark still reports the peers
        found["fastvlp_build"] = f"unavailable: {error}"
    return found


def summarize(raw_ms: Sequence[float]) -> Dict[str, float]:
    """Median and 10th/90th percentiles of a list of timings in ms."""
    ordered = sorted(raw_ms)
    if not ordered:
        raise ValueError("raw_ms must not be empty")
    if len(ordered) == 1:
        return {"median_ms": ordered[0], "p10_ms": ordered[0], "p90_ms": ordered[0]}
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    return {"median_ms": statistics.median(ordered), "p10_ms": deciles[0], "p90_ms": deciles[-1]}


def time_host_calls(call: Callable[[int], object], repeats: int, warmup: int = 2) -> List[float]:
    """Wall time in ms of ``call(i)`` for ``i`` in ``range(repeats)``, after ``warmup`` calls.
    The index lets each call take a fresh input from a pool."""
    for index in range(warmup):
        call(index)
    timings = []
    for index in range(repeats):
        start = time.perf_counter()
        call(warmup + index)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def time_cuda_calls(call: Callable[[int], object], repeats: int, warmup: int = 3) -> List[float]:
    """Device time in ms of ``call(i)`` between CUDA events, each call synchronised, after warm-up.
    A call that synchronises with the host inside is charged for it, as it should be."""
    for index in range(warmup):
        call(index)
    torch.cuda.synchronize()
    timings = []
    for index in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(warmup + index)
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end))
    return timings


def result_row(name: str, contender: str, shape: str, raw_ms: Iterable[float], **extra) -> Dict[str, object]:
    raw = [float(value) for value in raw_ms]
    return {"name": name, "contender": contender, "shape": shape, **summarize(raw), "raw_ms": raw, **extra}


def unavailable_row(name: str, contender: str, shape: str, reason: str, **extra) -> Dict[str, object]:
    """A peer that is not installed or rejects the call: reported, never dropped."""
    return {"name": name, "contender": contender, "shape": shape, "median_ms": None, "p10_ms": None,
            "p90_ms": None, "raw_ms": [], "status": reason, **extra}


def write_results(
    benchmark: str,
    rows: List[Dict[str, object]],
    device: str,
    out_dir: Optional[Path] = None,
    extra: Optional[Dict[str, object]] = None,
    table_columns: Sequence[str] = ("name", "contender", "shape", "median_ms", "p10_ms", "p90_ms"),
) -> Path:
    """Write ``<out_dir>/<device>/<benchmark>.json`` and a Markdown table beside it; returns the JSON path."""
    folder = Path(out_dir if out_dir is not None else DEFAULT_RESULTS_DIR) / device
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "device": device, "versions": versions(), **(extra or {}), "results": rows}
    json_path = folder / f"{benchmark}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    (folder / f"{benchmark}.md").write_text(markdown_table(payload, table_columns))
    return json_path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(payload: Dict[str, object], columns: Sequence[str]) -> str:
    rows = payload["results"]
    columns = list(columns) + (["status"] if any("status" in row for row in rows) else [])
    lines = [
        f"# {payload['benchmark']} on {payload['device']}",
        "",
        "Versions: " + ", ".join(f"{key} {value}" for key, value in payload["versions"].items() if key != "fastvlp_build"),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines) + "\n"
