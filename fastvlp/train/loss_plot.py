"""A PNG of the loss curves of a run's metrics.jsonl (needs matplotlib, which is optional)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from fastvlp.train.metrics_log import read_metrics

CURVES = ("loss", "loss_mlm", "loss_itm", "loss_det", "loss_cap")


def plot_losses(metrics_path: Path, out_path: Path) -> Optional[str]:
    """Write the curves to ``out_path``; returns None when written, else why not (matplotlib missing,
    nothing logged)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install matplotlib)"
    records = read_metrics(metrics_path)
    if not records:
        return f"no metrics in {metrics_path}: no loss plot"
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in CURVES:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), label=key, linewidth=1.5 if key == "loss" else 1.0)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return None


def plot_runs(metrics_paths: Dict[str, Path], out_path: Path) -> Optional[str]:
    """One panel per run (``{title: metrics.jsonl}``), each with every ``loss*`` curve it logged; returns
    None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install matplotlib)"
    runs = {title: read_metrics(path) for title, path in metrics_paths.items()}
    runs = {title: records for title, records in runs.items() if records}
    if not runs:
        return "no metrics logged: no loss plot"
    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for axis, (title, records) in zip(axes[0], runs.items()):
        keys = sorted({k for r in records for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), label=key, linewidth=1.5 if key == "loss" else 1.0)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return None
