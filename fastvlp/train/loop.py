"""The training loop shared by pre-training and every fine-tuning task: :func:`run_training`.

A step is one optimiser update over ``grad_accum`` micro-batches of ``batch_size`` per process. The loop
is resumable bit for bit on the CPU: model, optimizer, scheduler, sampler position and every RNG state
are checkpointed, samples depend only on ``(seed, epoch, index)`` and batch randomness on
``(seed, rank, step, micro-batch)``. What differs between tasks comes in a :class:`TrainingJob`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from fastvlp.train import checkpoint as ckpt
from fastvlp.train.distributed import DistributedContext, all_gather_objects, all_reduce_sum, barrier, resolve_device
from fastvlp.train.graph_steps import GraphSteps, cuda_graph_problem
from fastvlp.train.metrics_log import MetricsLog
from fastvlp.train.optim import BACKBONE_GROUPS, TRANSFORMER_GROUPS, group_learning_rate
from fastvlp.train.sampler import ResumableBatchSampler

logger = logging.getLogger("fastvlp.train")

METRICS = "metrics.jsonl"
RUN_INFO = ckpt.RUN_INFO
LOG_FILE = "train.log"
# Model-configuration fields a resumed run may change: they choose kernels, not the weights or the losses.
RESUMABLE_CONFIG_FIELDS = ("attention_backend", "matcher_backend")
# Settings a resumed run must share with its checkpoint (trainer_state.json key, option): the sampler's
# batches, the batch randomness and the learning-rate schedule all depend on them. --max-steps is one:
# the schedule's decay (and the default warm-up) are fractions of it; --stop-after stops a run early.
RESUME_SETTINGS = (
    ("world_size", "the process count (torchrun --nproc_per_node)"), ("batch_size", "--batch-size"),
    ("grad_accum", "--grad-accum"), ("seed", "--seed"), ("max_steps", "--max-steps"),
    ("warmup_steps", "--warmup-steps"),
)
# What the sampler's position and the unreadable-record indices are indices into (trainer_state.json key,
# option): a task that records them in TrainingJob.corpus has a resume on another corpus refused. Unlike
# RESUME_SETTINGS, None is a value here (no exclusion file); a checkpoint without the key is not compared.
CORPUS_SETTINGS = (("data", "--data"), ("exclude_images_sha256", "--exclude-images"), ("corpus_size", "--data"))


class RunExistsError(RuntimeError):
    """``--out`` already holds a run and ``--resume`` was not given."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class LoopOptions:
    """The loop's own settings (the command-line options every training command shares). ``warmup_steps``
    is the schedule's warm-up, recorded so that a resume with another one is refused (None: not checked).
    ``cuda_graph`` replays each step's forward and backward from a CUDA graph (:mod:`fastvlp.train.graph_steps`)."""

    max_steps: int
    stop_after: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    warmup_steps: Optional[int] = None
    save_every: int = 1000
    keep_last: Optional[int] = 3
    log_every: int = 1
    num_workers: int = 0
    max_consecutive_nonfinite: int = 5
    progress: bool = True
    description: str = "train"
    cuda_graph: bool = False


# How many images whose detection targets leave objects out RUN/train.log names (all are counted).
NAMED_DROPPED_OBJECT_IMAGES = 20

@dataclass
class TrainingJob:
    """What a task gives the loop.

    ``model(batch)`` returns an object with ``loss`` (the scalar to minimise) and ``losses`` (named
    scalars, the ``loss_keys`` other than ``"loss"``); the model also has ``config`` and, optionally,
    ``backend_report()``. ``dataset[(epoch, index)]`` returns a sample whose ``"skipped"`` entry lists the
    ``(index, reason, path)`` of unreadable records it stepped over; ``collate`` batches samples and keeps
    those lists under ``"skipped"``, and may list under ``"dropped_objects"`` the ``(index, unlabelled,
    outside_image, path)`` of records whose target left objects out (counted once per record, logged); ``build_batch(collated, generator)`` returns something with
    ``.to(device)``. ``save_files(directory)`` writes the task's own files (tokenizer, label spaces,
    ``task.json``) into each checkpoint. ``fixed_shapes(batch)``, where the task has it, gives the built batch
    in shapes fixed from batch to batch (or None for a batch that does not fit them): what ``cuda_graph`` steps
    replay. ``corpus`` maps keys of :data:`CORPUS_SETTINGS` to what the
    dataset was read from (its resolved data folder, the SHA-256 of its exclusion file or None, its size):
    recorded in ``trainer_state.json`` and compared on resume.
    """

    model: torch.nn.Module
    dataset: Dataset
    collate: Callable[[Sequence[Any]], Dict[str, Any]]
    build_batch: Callable[[Dict[str, Any], torch.Generator], Any]
    loss_keys: Sequence[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    save_files: Callable[[Path], None]
    clip_max_norm: float = 0.1
    fixed_shapes: Optional[Callable[[Any], Optional[Any]]] = None
    skipped_while_indexing: int = 0
    run_info: Dict[str, Any] = field(default_factory=dict)
    corpus: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingResult:
    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    metrics_path: Path
    nonfinite_skipped: int
    skipped_records: int
    backends: Dict[str, Any]


def validate_loop_options(options) -> None:
    """Shared checks of the integer options (on any object carrying them), naming the bad one."""
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every", "max_consecutive_nonfinite"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for name in ("stop_after", "keep_last"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
    if isinstance(options.seed, bool) or not isinstance(options.seed, int) or options.seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {options.seed!r}")
    if isinstance(options.num_workers, bool) or not isinstance(options.num_workers, int) or options.num_workers < 0:
        raise ValueError(f"num_workers: expected a non-negative int, got {options.num_workers!r}")


def checked_device(requested: Optional[Union[str, torch.device]], name: str = "device") -> torch.device:
    """:func:`~fastvlp.train.distributed.resolve_device` for a device this machine has, else a ValueError
    naming ``name``: a malformed device (``"cpux"``, which torch rejects with a RuntimeError), a type other
    than cpu and cuda, or a GPU that is not there."""
    if requested is not None and not isinstance(requested, (str, torch.device)):
        raise TypeError(f"{name}: expected a str or torch.device, got {type(requested).__name__}")
    if requested is not None:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {requested!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {requested!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{name}: {requested!r} asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {requested!r} asked for, but there are {torch.cuda.device_count()} GPUs")
    return resolve_device(None if requested is None else str(requested))


def triton_interpreter_problem() -> Optional[str]:
    """Why the Triton attention kernels cannot run CPU tensors in this process, or None when they can: on
    the CPU they run only in Triton's interpreter, which TRITON_INTERPRET=1 chooses before they are defined."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(error).__name__}: {error})"
    from fastvlp.ops.fmha.dispatch import interpreter_enabled

    if not interpreter_enabled():
        return "the interpreter is off: set TRITON_INTERPRET=1 in the environment before starting"
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    if not kernels_interpreted():
        return ("TRITON_INTERPRET=1 was set after the kernels were compiled for the GPU: set it in the environment "
                "before starting")
    return None


def check_attention_backend(backend: Optional[str], device: Union[str, torch.device],
                            name: str = "attention_backend") -> None:
    """Refuse the ``"triton"`` attention backend on the CPU unless Triton's interpreter can run its kernels
    here (ValueError naming ``name``): the first forward pass would fail otherwise, after the run's files
    are written."""
    if backend == "triton" and torch.device(device).type == "cpu":
        problem = triton_interpreter_problem()
        if problem is not None:
            raise ValueError(f"{name}: 'triton' on the CPU expects Triton's interpreter to run the kernels, but "
                             f"{problem} (or choose 'fastvlp', which runs the reference attention on the CPU)")


def check_config_overrides(base, overrides: Dict[str, Any]) -> None:
    """Check ``overrides`` (``--set``) against the model configuration ``base`` they will change: known
    fields, and values it accepts. Raises ValueError naming ``config_overrides``."""
    if not isinstance(overrides, dict):
        raise TypeError(f"config_overrides: expected a dict, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(base.to_dict()))
    if unknown:
        raise ValueError(f"config_overrides: unknown model configuration fields {unknown}")
    try:
        base.replace(**overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config_overrides: {error}") from None


def resumed_config(saved, changes: Dict[str, Any]):
    """The model configuration of a resumed run: ``saved`` (the checkpoint's ``E2EVLPConfig``) with the
    backend fields of ``changes`` applied. Any other field of ``changes`` (``--set``) must equal the
    saved value: the weights, optimizer state and losses were made with it. Raises ValueError naming it."""
    if not isinstance(changes, dict):
        raise TypeError(f"changes: expected a dict, got {type(changes).__name__}")
    for name, value in changes.items():
        if name in RESUMABLE_CONFIG_FIELDS:
            continue
        if not hasattr(saved, name):
            raise ValueError(f"--set {name}: not a field of the model configuration")
        if getattr(saved, name) != value:
            raise ValueError(
                f"--set {name}={value!r}: the run's checkpoint has {name}={getattr(saved, name)!r}; a resumed run "
                f"keeps its model configuration (only {', '.join(RESUMABLE_CONFIG_FIELDS)} may change)"
            )
    return saved.replace(**{name: value for name, value in changes.items() if name in RESUMABLE_CONFIG_FIELDS})


def check_resume_settings(saved: Dict[str, Any], current: Dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume from ``checkpoint`` with settings other than those its ``trainer_state.json``
    (``saved``) records: ``current`` maps the keys of :data:`RESUME_SETTINGS` and :data:`CORPUS_SETTINGS`
    to this call's values. A setting the checkpoint does not record (an older checkpoint) is not compared,
    nor one of RESUME_SETTINGS that is None on either side."""
    for key, option in RESUME_SETTINGS:
        if saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]:
            raise ValueError(f"{option}: the run was started with {saved[key]}, this call gives {current[key]}; keep "
                             f"it to resume from {checkpoint}" + ("; --stop-after stops a run early" if key == "max_steps" else ""))
    for key, option in CORPUS_SETTINGS:
        if key in saved and key in current and saved[key] != current[key]:
            raise ValueError(f"{option}: the run was started with {_corpus_setting(key, saved[key])}, this call gives "
                             f"{_corpus_setting(key, current[key])}; its sampler position indexes that corpus: keep it "
                             f"to resume from {checkpoint}")


def _corpus_setting(key: str, value: Any) -> str:
    if key == "exclude_images_sha256":
        return "no --exclude-images file" if value is None else f"an --exclude-images file of SHA-256 {value}"
    if key == "corpus_size":
        return f"{value} training images"
    return str(value)


def holds_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (METRICS, RUN_INFO, ckpt.CHECKPOINTS))


def configure_threads(context: DistributedContext) -> int:
    """On the CPU, share the cores this process may use among the local ranks (intra-op threads only), never
    raising the thread count the caller set."""
    if context.device.type != "cpu":
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    threads = max(1, min(torch.get_num_threads(), cores // max(1, local)))
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def run_directory(run_dir: Path, resume: bool, context: DistributedContext):
    """Refuse an ``--out`` that already holds a run unless resuming; create it; clear what interrupted
    checkpoint writes left in it; log to ``train.log``."""
    run_dir = Path(run_dir)
    existed = holds_run(run_dir)
    barrier(context)
    if existed and not resume:
        raise RunExistsError(f"out: {run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = None
    if context.is_main:
        handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fastvlp").addHandler(handler)
        logging.getLogger("fastvlp").setLevel(logging.INFO)
    try:
        if context.is_main:
            for path in ckpt.remove_stale_writes(run_dir):
                logger.info("cleared %s, left by an interrupted checkpoint write", path)
        barrier(context)  # the other ranks look for the newest checkpoint once rank 0 has restored or cleared
        yield run_dir
    finally:
        if handler is not None:
            logging.getLogger("fastvlp").removeHandler(handler)
            handler.close()


def resume_checkpoint(run_dir: Path, resume: bool) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` when resuming (None to start the run)."""
    found = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and found is None:
        logger.info("--resume: no checkpoint in %s yet, starting the run", run_dir)
    elif found is not None:
        logger.info("resuming from %s", found)
    return found


class _EpochKeyedBatches:
    """The sampler's remaining batches of its current epoch as ``(epoch, index)`` keys, fixed when iterated."""

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        batches = list(iter(self.sampler))
        return iter([[(epoch, i) for i in batch] for batch in batches])

    def __len__(self) -> int:
        return len(self.sampler)


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's randomness (masking, negatives): a function of its position only."""
    return torch.Generator().manual_seed(((seed * 65_537 + rank) * 1_000_003 + step) * 257 + micro)


def run_training(
    options: LoopOptions, job: TrainingJob, context: DistributedContext, run_dir: Path, resume_from: Optional[Path]
) -> TrainingResult:
    """Train ``job`` from step 0, or from the checkpoint ``resume_from``, up to ``options.max_steps`` (or
    ``stop_after``), logging to ``run_dir/metrics.jsonl`` and checkpointing under ``run_dir/checkpoints``."""
    model, optimizer, scheduler = job.model, job.optimizer, job.scheduler
    loss_keys = tuple(job.loss_keys)
    if not loss_keys or loss_keys[0] != "loss":
        raise ValueError(f"job.loss_keys: expected 'loss' first, got {loss_keys}")
    sampler = ResumableBatchSampler(
        len(job.dataset), options.batch_size, seed=options.seed, rank=context.rank, world_size=context.world_size
    )
    trainer: Dict[str, Any] = {
        "step": 0, "nonfinite_skipped": 0, "consecutive_nonfinite": 0, "unreadable_indices": [], "samples_seen": 0,
        "dropped_objects": {},  # record index (a str, as JSON keys are) -> objects its targets leave out
        "cuda_graph_fallbacks": 0,  # --cuda-graph steps whose batch did not fit the graph's shapes
    }
    unknown = sorted(set(job.corpus) - {key for key, _ in CORPUS_SETTINGS})
    if unknown:
        raise ValueError(f"job.corpus: expected keys of {[key for key, _ in CORPUS_SETTINGS]}, got {unknown}")
    settings = {"world_size": context.world_size, "batch_size": options.batch_size, "grad_accum": options.grad_accum,
                "seed": options.seed, "max_steps": options.max_steps, "warmup_steps": options.warmup_steps,
                **job.corpus}
    if resume_from is not None:
        check_resume_settings(ckpt.read_trainer_state(resume_from), settings, resume_from)
        state = ckpt.load_training_files(resume_from, model, optimizer, scheduler)
        saved = state.trainer
        trainer.update({k: saved[k] for k in trainer if k in saved})
        sampler.load_state_dict(saved["sampler"])
        rank_rng = state.rng.get(f"rank{context.rank}")
        if rank_rng is None:
            raise ValueError(f"--resume: {resume_from} has no RNG state for rank {context.rank}")
        ckpt.restore_rng_states(rank_rng)
    step = int(trainer["step"])
    stop_step = min(options.max_steps, options.stop_after or options.max_steps)

    metrics = MetricsLog(run_dir / METRICS)
    if context.is_main:
        dropped = metrics.truncate_after(step)
        if dropped:
            logger.info("dropped %d metrics lines logged after the checkpoint at step %d or torn", dropped, step)
        (run_dir / RUN_INFO).write_text(json.dumps(job.run_info, indent=1, default=str), encoding="utf-8")

    graph = None
    if options.cuda_graph:
        problem = cuda_graph_problem(context.device, options.grad_accum, context.world_size,
                                     getattr(getattr(getattr(model, "criterion", None), "matcher", None), "backend", None),
                                     job.fixed_shapes is not None)
        if problem:
            raise ValueError(problem)
        graph = GraphSteps(model, job.fixed_shapes, job.clip_max_norm if job.clip_max_norm > 0 else float("inf"),
                           amp=True)
    wrapped: torch.nn.Module = model
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    model.train()

    batches = _EpochKeyedBatches(sampler)

    def make_loader():
        return DataLoader(
            job.dataset, batch_sampler=batches, num_workers=options.num_workers, collate_fn=job.collate,
            pin_memory=context.device.type == "cuda", generator=torch.Generator().manual_seed(options.seed),
        )

    unreadable = set(trainer["unreadable_indices"])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if context.device.type == "cuda" else contextlib.nullcontext()
    )
    clip = job.clip_max_norm if job.clip_max_norm > 0 else float("inf")
    parameters = [p for p in model.parameters() if p.requires_grad]
    backends: Dict[str, Any] = {}
    last_checkpoint = resume_from
    logger.info("steps %d..%d of %d; batch %d x %d micro-batches x %d processes on %s", step + 1, stop_step,
                options.max_steps, options.batch_size, options.grad_accum, context.world_size, context.device)

    def save(step_now: int) -> Path:
        trainer_state = {
            **trainer, **settings, "step": step_now, "sampler": sampler.state_dict(),
            "unreadable_indices": sorted(unreadable),
        }
        rng = all_gather_objects(ckpt.capture_rng_states(), context)
        if context.is_main:
            def write(directory: Path) -> None:
                ckpt.save_training_files(directory, model, optimizer, scheduler, trainer_state,
                                         {f"rank{r}": states for r, states in enumerate(rng)})
                job.save_files(directory)

            logger.info("checkpoint %s", ckpt.write_checkpoint(run_dir, step_now, write, options.keep_last))
        barrier(context)
        return ckpt.checkpoint_dir(run_dir, step_now)

    progress = None
    if context.is_main and options.progress:
        from tqdm import tqdm

        progress = tqdm(total=options.max_steps, initial=step, desc=options.description, dynamic_ncols=True,
                        mininterval=1.0)
    running: Dict[str, float] = {}
    logged_backends = False
    loader_iter = iter(make_loader()) if step < stop_step else None
    try:
        while step < stop_step:
            started = time.perf_counter()
            sums = torch.zeros(2 * len(loss_keys) + 3, dtype=torch.float64)
            new_unreadable: List[Tuple[int, str, str]] = []
            new_dropped: List[Tuple[int, int, int, str]] = []
            for micro in range(options.grad_accum):
                try:
                    collated = next(loader_iter)
                except StopIteration:
                    loader_iter = iter(make_loader())
                    collated = next(loader_iter)
                sampler.advance()
                for index, reason, path in collated["skipped"]:
                    if index not in unreadable:
                        new_unreadable.append((index, reason, str(path)))
                for entry in collated.get("dropped_objects", ()):
                    if str(entry[0]) not in trainer["dropped_objects"]:
                        new_dropped.append(tuple(entry))
                batch = job.build_batch(collated, step_generator(options.seed, context.rank, step, micro))
                replayed = graph.run(batch) if graph is not None else None
                if replayed is not None:  # forward, backward and clipping, from the graph
                    output, graph_norm = replayed
                else:
                    if graph is not None:  # the graph's gradient tensors stay; an eager step accumulates into them
                        optimizer.zero_grad(set_to_none=False)
                        trainer["cuda_graph_fallbacks"] += 1
                    batch = batch.to(context.device)
                    sync = micro == options.grad_accum - 1 or not context.is_distributed
                    with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                        with autocast:
                            output = wrapped(batch)
                        (output.loss / options.grad_accum).backward()
                for position, key in enumerate(loss_keys):
                    value = output.loss if key == "loss" else output.losses.get(key)
                    if value is not None:
                        sums[2 * position] += float(value.detach())
                        sums[2 * position + 1] += 1
            grad_norm = graph_norm if replayed is not None else torch.nn.utils.clip_grad_norm_(parameters, clip)
            sums[-3] = float(grad_norm)
            sums[-2] = len(new_unreadable)
            sums[-1] = len(new_dropped)
            total = all_reduce_sum(sums.clone(), context)
            if total[-1] > 0:  # as for unreadable records: every rank's, named once in RUN/train.log
                for records in all_gather_objects(new_dropped, context):
                    for index, unlabelled, outside, path in records:
                        if str(index) not in trainer["dropped_objects"]:
                            trainer["dropped_objects"][str(index)] = unlabelled + outside
                            named = len(trainer["dropped_objects"])
                            # Real Visual Genome has such objects in most images: name the first few only.
                            if context.is_main and named <= NAMED_DROPPED_OBJECT_IMAGES:
                                logger.warning("%s: %d objects left out of its detection target (%d with a class "
                                               "outside the label space, %d with a box outside the decoded image)%s",
                                               path, unlabelled + outside, unlabelled, outside,
                                               "; further such images are counted in dropped_objects, not named"
                                               if named == NAMED_DROPPED_OBJECT_IMAGES else "")
            if total[-2] > 0:
                # Every rank's new records, so that the main rank names in RUN/train.log those another rank read.
                for records in all_gather_objects(new_unreadable, context):
                    for index, reason, path in records:
                        if index not in unreadable:
                            unreadable.add(index)
                            if context.is_main:
                                logger.warning("skipped an unreadable record (%s): %s", reason, path)
            trainer["samples_seen"] += options.batch_size * options.grad_accum * context.world_size
            means = {
                key: (float(total[2 * i] / total[2 * i + 1]) if total[2 * i + 1] > 0 else None)
                for i, key in enumerate(loss_keys)
            }
            finite = means["loss"] is not None and math.isfinite(means["loss"]) and math.isfinite(float(total[-3]))
            lr = group_learning_rate(optimizer, TRANSFORMER_GROUPS)
            lr_backbone = group_learning_rate(optimizer, BACKBONE_GROUPS)
            if not finite:
                optimizer.zero_grad(set_to_none=graph is None)
                trainer["nonfinite_skipped"] += 1
                trainer["consecutive_nonfinite"] += 1
                logger.warning("non-finite loss or gradient (loss %s, grad norm %s) at step %d: update skipped "
                               "(%d skipped so far)", means["loss"], float(total[-3]), step + 1, trainer["nonfinite_skipped"])
                if trainer["consecutive_nonfinite"] >= options.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{trainer['consecutive_nonfinite']} consecutive steps had a non-finite loss or gradient "
                        f"(at step {step + 1}): stopping. Lower the learning rate, check the data, or resume from "
                        f"the last checkpoint ({last_checkpoint})."
                    )
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=graph is None)
            step += 1
            trainer["step"] = step
            trainer["consecutive_nonfinite"] = 0
            if not backends and hasattr(model, "backend_report"):
                backends = model.backend_report()
                logger.info("backends: %s", json.dumps(backends))
            elapsed = time.perf_counter() - started
            if context.is_main and (step % options.log_every == 0 or step == stop_step):
                record = {
                    "step": step, **means, "lr": lr, "lr_backbone": lr_backbone,
                    "grad_norm": float(total[-3]) / context.world_size,
                    "skipped_records": job.skipped_while_indexing + len(unreadable),
                    "dropped_objects": sum(trainer["dropped_objects"].values()),
                    "nonfinite_skipped": trainer["nonfinite_skipped"], "epoch": sampler.epoch,
                    "samples_seen": trainer["samples_seen"], "step_time_s": round(elapsed, 4),
                }
                if graph is not None:
                    record["cuda_graph_fallbacks"] = trainer["cuda_graph_fallbacks"]
                if not logged_backends:  # the first line this process writes says which kernels ran
                    record["backends"] = backends
                    logged_backends = True
                metrics.write(record)
            if progress is not None:
                for key in loss_keys:
                    if means[key] is not None:
                        running[key] = means[key] if key not in running else 0.9 * running[key] + 0.1 * means[key]
                progress.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in running.items()}, refresh=False)
                progress.update(1)
            if step % options.save_every == 0 or step == stop_step:
                last_checkpoint = save(step)
    finally:
        if progress is not None:
            progress.close()
    skipped = job.skipped_while_indexing + len(unreadable)
    if stop_step < options.max_steps:
        logger.info("stopped after step %d of %d (--stop-after): continue with --resume", step, options.max_steps)
    logger.info("done at step %d; %d records skipped, %d objects left out of detection targets, %d non-finite "
                "steps skipped; metrics in %s", step, skipped, sum(trainer["dropped_objects"].values()),
                trainer["nonfinite_skipped"], run_dir / METRICS)
    return TrainingResult(run_dir, step, ckpt.latest_checkpoint(run_dir), run_dir / METRICS,
                          trainer["nonfinite_skipped"], skipped, backends)
