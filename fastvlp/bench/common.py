"""What every benchmark shares: the device's name, library versions, the run's provenance, timing
(compiled calls included), and result files."""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

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


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_STARTED_UTC = _utc_now()  # when the benchmark's process imported this module: the run's start


def _run(command: Sequence[str], cwd: Optional[Path] = None) -> str:
    """A command's stripped stdout; raises OSError or CalledProcessError when it cannot run or fails."""
    done = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    return done.stdout.strip()


def _git_state() -> Dict[str, object]:
    """The commit of the source tree fastvlp is imported from, and whether tracked files differ from it.
    A tree copied without its ``.git``, or with a ``.git`` that does not follow the copied files, names
    its commit in ``FASTVLP_BENCH_GIT_COMMIT``: a stated commit comes first, with what git says beside it."""
    import fastvlp

    tree = Path(fastvlp.__file__).resolve().parent.parent
    stated = os.environ.get("FASTVLP_BENCH_GIT_COMMIT")
    try:
        commit = _run(["git", "rev-parse", "HEAD"], cwd=tree)
        dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree))
    except (OSError, subprocess.SubprocessError) as error:  # an installed copy, or no git
        if stated:
            return {"git_commit": f"{stated} (stated by FASTVLP_BENCH_GIT_COMMIT)", "git_dirty": None}
        return {"git_commit": f"unavailable: {type(error).__name__}", "git_dirty": None}
    if stated and not commit.startswith(stated) and not stated.startswith(commit):
        seen = f"{commit}{' with changes' if dirty else ''}"
        return {"git_commit": f"{stated} (stated by FASTVLP_BENCH_GIT_COMMIT; git in the tree says {seen})",
                "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over the paths and contents of fastvlp's Python sources and, beside a source checkout,
    ``csrc/``: it identifies the code that ran even where git cannot."""
    import fastvlp

    package = Path(fastvlp.__file__).resolve().parent
    files = sorted(package.rglob("*.py"))
    csrc = package.parent / "csrc"
    if csrc.is_dir():
        files += sorted(path for path in csrc.rglob("*") if path.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _driver_version() -> str:
    if not torch.cuda.is_available():
        return "none (no CUDA device)"
    try:
        return _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        return f"unavailable: {type(error).__name__}"


def _cudnn_version() -> Optional[int]:
    try:
        return torch.backends.cudnn.version()
    except Exception:  # a build without cuDNN
        return None


def provenance() -> Dict[str, object]:
    """What identifies the run that wrote a results file: the code (git commit, whether the tree was
    dirty, and a digest of the sources), the command line, the host, when it started and when the file was written (UTC), the library
    and driver versions, the device, the thread count and the TF32 switches. ``run_id`` and ``gpu_tests``
    come from ``FASTVLP_BENCH_RUN_ID`` / ``FASTVLP_BENCH_GPU_TESTS``, which ``bench/gpu.sh`` sets, so that
    the files of one scripted run can be told from older ones beside them."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "missing"
    cuda = torch.cuda.is_available()
    return {
        "run_id": os.environ.get("FASTVLP_BENCH_RUN_ID"),
        "gpu_tests": os.environ.get("FASTVLP_BENCH_GPU_TESTS"),
        **_git_state(),
        "source_sha256": source_digest(),
        "command": " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv]),
        "hostname": socket.gethostname(),
        "started_utc": _STARTED_UTC,
        "written_utc": _utc_now(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_toolkit": torch.version.cuda or "none",
        "cudnn": _cudnn_version(),
        "driver": _driver_version(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def header_lines(payload: Dict[str, object]) -> List[str]:
    """The lines under a results table's title: a partial-run warning, the provenance, the versions."""
    lines = []
    if payload.get("complete") is False:
        lines += ["**Partial results: the benchmark stopped before its last measurement.**", ""]
    origin = payload.get("provenance") or {}
    if origin:
        dirty = " (dirty tree)" if origin.get("git_dirty") else ""
        lines += [f"Run: commit {origin.get('git_commit')}{dirty}, run id {origin.get('run_id')}, "
                  f"host {origin.get('hostname')}, started {origin.get('started_utc')}, "
                  f"written {origin.get('written_utc')}; GPU tests: {origin.get('gpu_tests') or 'not recorded'}", "",
                  f"Command: `{origin.get('command')}`", "",
                  f"Device: GPU {origin.get('gpu')}, driver {origin.get('driver')}, cuDNN {origin.get('cudnn')}, "
                  f"CPU {origin.get('cpu')} ({origin.get('cpu_count')} cores, {origin.get('torch_threads')} torch "
                  f"threads), TF32 matmul {origin.get('tf32_matmul')}, TF32 cuDNN {origin.get('tf32_cudnn')}", ""]
    versions_found = payload.get("versions") or {}
    lines += ["Versions: " + ", ".join(f"{key} {value}" for key, value in versions_found.items()
                                        if key != "fastvlp_build"), ""]
    return lines


# ---------------------------------------------------------------- compiled calls

class CompiledDuringTiming(RuntimeError):
    """torch.compile compiled (or recompiled) a frame during the timed calls."""


def compiled_frames() -> int:
    """Frames Dynamo has tried to compile in this process: it grows on every cache miss."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


@contextlib.contextmanager
def strict_compilation() -> Iterator[None]:
    """Within it, a function that reaches Dynamo's recompile limit raises instead of silently running
    eagerly (uncompiled) from then on; the previous setting is restored on exit."""
    from torch._dynamo import config

    # Older torch names the switch after the "cache size" limit.
    name = "fail_on_recompile_limit_hit" if hasattr(config, "fail_on_recompile_limit_hit") else "fail_on_cache_limit_hit"
    with config.patch(**{name: True}):
        yield


def time_compiled_calls(timer: Callable[..., List[float]], call: Callable[[int], object], repeats: int,
                        warmup: int) -> List[float]:
    """``timer(call, repeats, warmup)`` for a call that runs ``torch.compile``'d code. It runs under
    :func:`strict_compilation`, and raises :class:`CompiledDuringTiming` if anything was compiled during
    the timed calls: compilation belongs to the warm-up, so ``warmup`` must be at least 1."""
    if warmup < 1:
        raise ValueError(f"warmup: a compiled call needs at least 1 warm-up call to compile outside the "
                         f"timing, got {warmup}")
    frames_at_first_timed_call: List[int] = []

    def counted(index: int):
        if index == warmup:
            frames_at_first_timed_call.append(compiled_frames())
        return call(index)

    with strict_compilation():
        timings = timer(counted, repeats, warmup)
    compiled = compiled_frames() - frames_at_first_timed_call[0]
    if compiled:
        raise CompiledDuringTiming(f"torch.compile compiled {compiled} frame(s) during the timed calls")
    return timings


def error_reason(error: BaseException, limit: int = 300) -> str:
    """One line naming why a contender was not timed; a recompile-limit hit is named as such."""
    if type(error).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
        return ("not timed: torch.compile hit Dynamo's recompile limit, past which it would have run "
                "the function uncompiled")
    if isinstance(error, CompiledDuringTiming):
        return f"not timed: {error}"
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:limit]


# Settled timings of one contender differ by a few per cent; a first half this much slower than the second
# means the contender was still warming up (clocks, caches, allocator) while it was timed.
DRIFT_LIMIT = 1.15
# Warm-up lasts at least this long on a GPU, whatever the call count: a fixed count of fast calls can end
# before the GPU's clocks have risen.
MIN_CUDA_WARMUP_S = 0.1
_SPUN_UP: set = set()


def summarize(raw_ms: Sequence[float]) -> Dict[str, float]:
    """Median and 10th/90th percentiles of a list of timings in ms, and, from six timings on, ``drift``: the
    median of the first half over the median of the second (about 1 once the timings have settled)."""
    ordered = sorted(raw_ms)
    if not ordered:
        raise ValueError("raw_ms must not be empty")
    if len(ordered) == 1:
        return {"median_ms": ordered[0], "p10_ms": ordered[0], "p90_ms": ordered[0]}
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    summary = {"median_ms": statistics.median(ordered), "p10_ms": deciles[0], "p90_ms": deciles[-1]}
    if len(raw_ms) >= 6:
        half = len(raw_ms) // 2
        later = statistics.median(raw_ms[-half:])
        summary["drift"] = statistics.median(raw_ms[:half]) / later if later > 0 else float("nan")
    return summary


def unsettled(row: Dict[str, object]) -> bool:
    """Whether a row's timings were still falling (or rising) while it was timed (see ``DRIFT_LIMIT``)."""
    drift = row.get("drift")
    return isinstance(drift, float) and not (1 / DRIFT_LIMIT <= drift <= DRIFT_LIMIT)


def min_warmup_seconds(device: torch.device) -> float:
    """How long a warm-up lasts at least, whatever its call count: on a GPU, until its clocks have risen."""
    return MIN_CUDA_WARMUP_S if torch.device(device).type == "cuda" else 0.0


def unsettled_rows_note(rows: Sequence[Dict[str, object]]) -> str:
    """What a printed timing or ratio adds when one of its rows was still speeding up (or slowing down)
    while it was timed; empty when all have settled or were too few to tell."""
    drifting = [f"{row['contender']} drift {row['drift']:.2f}" for row in rows if unsettled(row)]
    return f" (unsettled: {', '.join(drifting)})" if drifting else ""


def device_error(text: str) -> Optional[str]:
    """Why ``--device text`` cannot run here, or None where it can."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"--device must name a device such as cpu, cuda or cuda:1, got {text!r}"
    if device.type not in ("cpu", "cuda"):
        return f"--device must be the CPU or a CUDA device, got {text!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {text} needs a CUDA GPU, and none is available"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {text}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def spin_up(device: Optional[torch.device] = None, seconds: float = 1.0) -> None:
    """Keep the GPU busy with matrix products for about ``seconds``, once per process and device, so that
    its clocks have risen before the first contender is timed: otherwise the first contender of a run pays
    for the ramp, and it is the same contender every run."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda" or device in _SPUN_UP:
        return
    _SPUN_UP.add(device)
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def warm_up(call: Callable[[int], object], calls: int, min_seconds: float = 0.0,
            synchronize: Callable[[], object] = lambda: None) -> int:
    """Call ``call(i)`` at least ``calls`` times and until ``min_seconds`` have passed (``synchronize`` runs
    after each call, so that the time counts finished work); returns how many calls were made."""
    start, index = time.perf_counter(), 0
    while index < calls or time.perf_counter() - start < min_seconds:
        call(index)
        synchronize()
        index += 1
    return index


def time_host_calls(call: Callable[[int], object], repeats: int, warmup: int = 2) -> List[float]:
    """Wall time in ms of ``call(i)`` for ``repeats`` calls, after ``warmup`` calls.
    The index lets each call take a fresh input from a pool."""
    done = warm_up(call, warmup)
    timings = []
    for index in range(repeats):
        start = time.perf_counter()
        call(done + index)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def time_cuda_calls(call: Callable[[int], object], repeats: int, warmup: int = 3,
                    min_warmup_s: float = MIN_CUDA_WARMUP_S) -> List[float]:
    """Latency in ms of ``call(i)`` between CUDA events, each call synchronised (so host launch time counts
    where the GPU waits for it), after :func:`spin_up` and a warm-up of at least ``warmup`` calls and
    ``min_warmup_s`` seconds. A call that synchronises with the host inside is charged for it, as it
    should be."""
    spin_up()
    done = warm_up(call, warmup, min_warmup_s, torch.cuda.synchronize)
    timings = []
    for index in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(done + index)
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end))
    return timings


def result_row(name: str, contender: str, shape: str, raw_ms: Iterable[float], **extra) -> Dict[str, object]:
    raw = [float(value) for value in raw_ms]
    row = {"name": name, "contender": contender, "shape": shape, **summarize(raw), "raw_ms": raw, **extra}
    if "drift" in row:
        row["settled"] = not unsettled(row)
    return row


def unavailable_row(name: str, contender: str, shape: str, reason: str, **extra) -> Dict[str, object]:
    """A peer that is not installed or rejects the call: reported, never dropped."""
    return {"name": name, "contender": contender, "shape": shape, "median_ms": None, "p10_ms": None,
            "p90_ms": None, "raw_ms": [], "status": reason, **extra}


def result_payload(benchmark: str, rows: List[Dict[str, object]], device: str,
                   extra: Optional[Dict[str, object]] = None, complete: bool = True) -> Dict[str, object]:
    """A results file's content: the benchmark, device, whether it finished (``complete``), the run's
    provenance and versions, the benchmark's own fields, and the rows (raw per-repeat timings in each)."""
    return {"benchmark": benchmark, "device": device, "complete": bool(complete), "provenance": provenance(),
            "versions": versions(), **(extra or {}), "results": rows}


def write_results(
    benchmark: str,
    rows: List[Dict[str, object]],
    device: str,
    out_dir: Optional[Path] = None,
    extra: Optional[Dict[str, object]] = None,
    table_columns: Sequence[str] = ("name", "contender", "shape", "median_ms", "p10_ms", "p90_ms"),
    complete: bool = True,
) -> Path:
    """Write ``<out_dir>/<device>/<benchmark>.json`` and a Markdown table beside it; returns the JSON path.
    ``complete=False`` marks a file written before the benchmark finished (it is rewritten at the end)."""
    folder = Path(out_dir if out_dir is not None else DEFAULT_RESULTS_DIR) / device
    folder.mkdir(parents=True, exist_ok=True)
    payload = result_payload(benchmark, rows, device, extra, complete)
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
        *header_lines(payload),
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines) + "\n"
