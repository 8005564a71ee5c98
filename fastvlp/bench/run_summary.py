"""The summary of one scripted benchmark run (``bench/gpu.sh``): each step's outcome, and which result
files beside it this run wrote, finished or left partial.

    python -m fastvlp.bench.run_summary RESULTS_DIR STEPS_TSV RUN_ID

``STEPS_TSV`` has one line per step, ``name<TAB>status<TAB>seconds<TAB>detail``, with status ``ok``,
``failed``, ``timed out`` or ``skipped``. It writes ``RESULTS_DIR/gpu_run.json`` and ``gpu_run.md``. A result
file counts as this run's when its provenance carries ``RUN_ID``; the others are from earlier runs and are
listed as such, so that one folder never passes off two runs as one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

STATUSES = ("ok", "failed", "timed out", "skipped")
# Steps whose failure means the results must not be read as measurements of working code.
GATING_STEPS = ("gpu-check", "build", "cuda-tests")


def read_steps(path: Path) -> List[Dict[str, object]]:
    """The steps of a ``STEPS_TSV`` file, in order; raises ValueError on a malformed line."""
    steps = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4 or parts[1] not in STATUSES:
            raise ValueError(f"steps file {path}, line {number}: expected name, status in {STATUSES}, seconds "
                             f"and detail separated by tabs, got {line!r}")
        name, status, seconds, detail = parts
        steps.append({"name": name, "status": status, "seconds": int(seconds) if seconds.isdigit() else None,
                      "detail": detail})
    return steps


def result_files(results_dir: Path, run_id: str) -> List[Dict[str, object]]:
    """Each ``*.json`` result file under ``results_dir`` (the comparison runs' subfolders included), named by
    its path relative to it: whether this run wrote it and whether it is complete."""
    files = []
    root = Path(results_dir)
    for path in sorted(root.rglob("*.json")):
        if path.name.startswith("gpu_run"):
            continue
        name = path.relative_to(root).as_posix()
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            files.append({"file": name, "this_run": False, "complete": None,
                          "note": f"unreadable: {type(error).__name__}"})
            continue
        origin = payload.get("provenance") or {}
        files.append({"file": name, "this_run": origin.get("run_id") == run_id,
                      "complete": payload.get("complete"), "run_id": origin.get("run_id"),
                      "git_commit": origin.get("git_commit")})
    return files


def summarize_run(results_dir: Path, steps: Sequence[Dict[str, object]], run_id: str) -> Dict[str, object]:
    """The summary's content; ``warnings`` name every failed, timed-out or gating step and partial file."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id: expected a non-empty string, got {run_id!r}")
    files = result_files(results_dir, run_id)
    warnings = []
    for step in steps:
        if step["status"] in ("failed", "timed out"):
            gating = " - the results below are not backed by it" if step["name"] in GATING_STEPS else ""
            warnings.append(f"step {step['name']} {step['status'].upper()}{gating}: {step['detail']}")
        elif step["status"] == "skipped":
            warnings.append(f"step {step['name']} skipped: {step['detail']}")
    for entry in files:
        if entry["this_run"] and entry["complete"] is not True:
            warnings.append(f"{entry['file']} is PARTIAL: its benchmark stopped before the end")
    failed = [step["name"] for step in steps if step["status"] in ("failed", "timed out")]
    return {"run_id": run_id, "ok": not failed, "failed_steps": failed, "warnings": warnings,
            "steps": list(steps), "files": files}


def markdown(summary: Dict[str, object]) -> str:
    lines = [f"# Benchmark run {summary['run_id']}", ""]
    if summary["warnings"]:
        lines += [f"**{warning}**" for warning in summary["warnings"]] + [""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {step['name']} | {step['status']} | {step['seconds'] if step['seconds'] is not None else '-'} | "
              f"{step['detail']} |" for step in summary["steps"]]
    lines += ["", "| result file | written by this run | complete | run id | commit |", "|---|---|---|---|---|"]
    lines += [f"| {entry['file']} | {'yes' if entry['this_run'] else 'no (an earlier run)'} | {entry['complete']} | "
              f"{entry.get('run_id')} | {entry.get('git_commit')} |" for entry in summary["files"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 3:
        print("usage: python -m fastvlp.bench.run_summary RESULTS_DIR STEPS_TSV RUN_ID", file=sys.stderr)
        return 2
    results_dir, steps_path, run_id = Path(arguments[0]), Path(arguments[1]), arguments[2]
    results_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_run(results_dir, read_steps(steps_path) if steps_path.exists() else [], run_id)
    (results_dir / "gpu_run.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results_dir / "gpu_run.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
