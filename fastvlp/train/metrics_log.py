"""``RUN/metrics.jsonl``: one JSON object a line per logged step, appended; on resume, lines of steps after
the checkpoint (logged by a run that then died) are dropped so that no step appears twice, and so is a
line torn by the crash, so that no appended step is lost to it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN: a non-finite loss is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Every record of a metrics file, in order (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to ``path``; ``truncate_after(step)`` keeps only the records up to ``step``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step`` greater than ``step`` and lines that are not whole records (torn by a
        crash); returns how many lines were dropped. The file is rewritten atomically whenever a line is
        dropped or the last line has no newline, so that the next record starts a line of its own."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        if not self.path.is_file():
            return 0
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (not isinstance(record.get("step"), int) or record["step"] <= step):
                kept.append(record)
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return len(lines) - len(kept)

    def last_step(self) -> int:
        steps = [r["step"] for r in read_metrics(self.path) if isinstance(r.get("step"), int)]
        return max(steps, default=0)

    def write(self, record: Dict[str, Any]) -> None:
        if not isinstance(record, dict):
            raise TypeError(f"record: expected a dict, got {type(record).__name__}")
        line = json.dumps({key: _finite_or_none(value) for key, value in record.items()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
