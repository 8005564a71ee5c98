"""Training checkpoints: ``RUN/checkpoints/step-<N>/``, written atomically, the newest ``keep_last`` kept.

A checkpoint holds ``config.json``, ``tokenizer.json``, ``model.safetensors`` (tied weights stored once),
the label spaces (``objects_vocab.txt``, ``attributes_vocab.txt``, ``category_map.json``), ``preset.json``
(the preset the model came from, which decides its image scale), ``trainer_state.json`` (step, sampler
position, the run's settings, counters), and optimizer, scheduler and RNG states as safetensors + JSON
pairs. Nothing in it needs unpickling. A checkpoint directory is self-contained: it can be copied away
from its run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors.torch import load_model, save_model

from fastvlp.train.state_files import load_state, save_state

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# What an interrupted write leaves: the directory being filled, or the checkpoint it was replacing.
_PARTIAL_DIR = re.compile(r"^\.(tmp|old)-step-(\d+)-\d+$")
TRAINER_STATE = "trainer_state.json"
PRESET_FILE = "preset.json"
RUN_INFO = "run.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step}"


def list_checkpoints(run_dir: Path) -> List[Path]:
    """The complete checkpoints of a run, oldest first. Temporary directories (a write that did not finish)
    are not listed: a checkpoint only gets its ``step-<N>`` name by the final rename."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_writes(run_dir: Path) -> List[Path]:
    """Clear what interrupted writes left in ``RUN/checkpoints``: a ``.tmp-step-N-<pid>`` directory (a write
    that did not finish) is deleted; an ``.old-step-N-<pid>`` one (the checkpoint a write was replacing) is
    renamed back to ``step-N`` when it is complete and no ``step-N`` exists (the write stopped between its
    two renames), else deleted. ``step-N`` directories are never touched. Only one process writes a run's
    checkpoints (rank 0), and it calls this before it writes, so every such directory is stale. Returns
    the directories deleted or restored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    cleared = []
    for path in sorted(root.iterdir()):
        match = _PARTIAL_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        final = root / f"step-{match.group(2)}"
        if match.group(1) == "old" and not final.exists() and (path / TRAINER_STATE).is_file():
            path.rename(final)
        else:
            shutil.rmtree(path, ignore_errors=True)
        cleared.append(path)
    return cleared


def write_checkpoint(run_dir: Path, step: int, write_files: Callable[[Path], None], keep_last: Optional[int] = None) -> Path:
    """Create ``step-<step>`` atomically: ``write_files(tmp_dir)`` fills a temporary directory, every file
    is fsynced, then the directory is renamed into place (replacing an older checkpoint of the same step).
    What earlier interrupted writes left is cleared first (:func:`remove_stale_writes`). With
    ``keep_last``, older checkpoints beyond the newest ``keep_last`` are deleted afterwards."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_files(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(tmp)
        if final.exists():
            old = root / f".old-step-{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def write_preset(directory: Path, preset: Optional[str], scale: Optional[Any] = None) -> None:
    """Record in the checkpoint ``directory`` the preset its model was built from and the image scale it
    was trained at (a :func:`fastvlp.data.transforms.scale_record`)."""
    (Path(directory) / PRESET_FILE).write_text(json.dumps({"preset": preset, "scale": scale}), encoding="utf-8")


def _preset_record(directory: Path) -> Dict[str, Any]:
    # A checkpoint written before it held preset.json has its run's run.json two folders up.
    directory = Path(directory)
    for path in (directory / PRESET_FILE, directory.parent.parent / RUN_INFO):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def checkpoint_preset(directory: Path) -> Optional[str]:
    """The preset a pre-training checkpoint's model was built from: its own ``preset.json``, else (a
    checkpoint written before it held one) the ``run.json`` of the run it still sits in; None when
    neither says."""
    return _preset_record(directory).get("preset")


def checkpoint_scale(directory: Path) -> Optional[Any]:
    """The image scale a pre-training checkpoint was trained at, as ``preset.json`` records it (a scale
    name or a ScaleConfig's fields); None for a checkpoint written before it recorded one."""
    directory = Path(directory)
    if not (directory / PRESET_FILE).is_file():
        return None
    return _preset_record(directory).get("scale")


def read_trainer_state(directory: Path) -> Dict[str, Any]:
    """A complete checkpoint's ``trainer_state.json`` (step, sampler position, the run's settings)."""
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"directory: {directory} is not a complete checkpoint (no {TRAINER_STATE})")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class TrainingState:
    """What a pre-training checkpoint restores, beyond the model weights."""

    trainer: Dict[str, Any]
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    rng: Dict[str, Any]


def save_training_files(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: Dict[str, Any],
    rng_states: Dict[str, Any],
) -> None:
    """Write the model, optimizer, scheduler, trainer and RNG states into ``directory``."""
    directory = Path(directory)
    save_model(model, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(model.config.to_json(), encoding="utf-8")
    save_state(optimizer.state_dict(), directory, "optimizer")
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (directory / "scheduler.json").write_text(json.dumps(scheduler_state, indent=1), encoding="utf-8")
    save_state(rng_states, directory, "rng")
    (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True), encoding="utf-8")


def load_training_files(
    directory: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
) -> TrainingState:
    """Load the weights into ``model`` (strictly) and, when given, the optimizer and scheduler states;
    returns every state read. The scheduler's schedule itself is rebuilt by the caller."""
    directory = Path(directory)
    trainer = read_trainer_state(directory)
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=True)
    optimizer_state = load_state(directory, "optimizer")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler_state = json.loads((directory / "scheduler.json").read_text(encoding="utf-8"))
    if scheduler is not None:
        current = scheduler.state_dict()
        scheduler.load_state_dict({**scheduler_state, "lr_lambdas": current.get("lr_lambdas", [None])})
    return TrainingState(trainer, optimizer_state, scheduler_state, load_state(directory, "rng"))


def capture_rng_states() -> Dict[str, Any]:
    """This process's torch RNG states as uint8 tensors (CPU, and every CUDA device when present)."""
    states: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    if "cpu" not in states:
        raise ValueError("states: expected a 'cpu' RNG state")
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = list(states["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
