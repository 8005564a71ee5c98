"""The pre-training loop: ``run_pretraining(PretrainOptions(...))`` (the ``fastvlp pretrain`` command).

A step is one optimiser update over ``grad_accum`` micro-batches of ``batch_size`` per process. The run
is resumable bit for bit on the CPU: model, optimizer, scheduler, sampler position and every RNG state are
checkpointed, samples depend only on ``(seed, epoch, index)`` and batch masking on ``(seed, rank, step)``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import ScaleConfig, train_transform
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import PRESETS, get_preset
from fastvlp.train import checkpoint as ckpt
from fastvlp.train.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from fastvlp.train.metrics_log import MetricsLog
from fastvlp.train.optim import BACKBONE_GROUPS, TRANSFORMER_GROUPS, build_optimizer, group_learning_rate
from fastvlp.train.pretrain_data import (
    TOKENIZER,
    BatchBuilder,
    PretrainingSamples,
    build_label_spaces,
    build_tokenizer,
    collate_pretraining_samples,
    load_label_spaces,
    read_corpus,
    save_label_spaces,
)
from fastvlp.train.sampler import ResumableBatchSampler
from fastvlp.train.schedule import build_scheduler, default_warmup_steps

logger = logging.getLogger("fastvlp.train")

METRICS = "metrics.jsonl"
RUN_INFO = "run.json"
LOG_FILE = "train.log"
LOSS_KEYS = ("loss", "loss_mlm", "loss_itm", "loss_det", "loss_cap")


class RunExistsError(RuntimeError):
    """``--out`` already holds a run and ``--resume`` was not given."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class PretrainOptions:
    """Everything ``fastvlp pretrain`` takes. ``config_overrides`` change the preset (e.g. a smaller
    ``d_model`` for tests); ``scale`` is the transform's scale (a ScaleConfig or a preset name; default ``tiny`` for the tiny
    model preset, ``paper`` otherwise)."""

    preset: str
    data: Path
    out: Path
    max_steps: int = 1000
    stop_after: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    resume: bool = False
    save_every: int = 1000
    keep_last: Optional[int] = 3
    log_every: int = 1
    warmup_steps: Optional[int] = None
    attention_backend: Optional[str] = None
    matcher_backend: Optional[str] = None
    device: Optional[str] = None
    num_workers: int = 0
    exclude_images: Optional[Path] = None
    backbone_weights: Optional[Path] = None
    vocab: Optional[Path] = None
    scale: Optional[Union[str, ScaleConfig]] = None
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    max_consecutive_nonfinite: int = 5
    progress: bool = True

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)}, got {self.preset!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every", "max_consecutive_nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("stop_after", "keep_last"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers: expected a non-negative int, got {self.num_workers!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps: expected 0..max_steps={self.max_steps}, got {self.warmup_steps!r}")
        for name in ("exclude_images", "backbone_weights", "vocab"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{name}: no such file: {value}")
        if not Path(self.data).is_dir():
            raise FileNotFoundError(f"data: no such directory: {self.data}")


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    metrics_path: Path
    nonfinite_skipped: int
    skipped_records: int
    backends: Dict[str, Any]


def holds_run(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (METRICS, RUN_INFO, ckpt.CHECKPOINTS))


def configure_threads(context: DistributedContext) -> int:
    """On the CPU, share the cores this process may use among the local ranks (intra-op threads only)."""
    if context.device.type != "cpu":
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    return threads


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


def _step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 65_537 + rank) * 1_000_003 + step) * 257 + micro)


def _setup_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fastvlp").addHandler(handler)
    logging.getLogger("fastvlp").setLevel(logging.INFO)
    return handler


def run_pretraining(options: PretrainOptions) -> PretrainResult:
    """Pre-train (or resume pre-training) as ``options`` say; returns where the run stopped."""
    if not isinstance(options, PretrainOptions):
        raise TypeError(f"options: expected PretrainOptions, got {type(options).__name__}")
    options.validate()
    context = init_distributed(options.device)
    run_dir = Path(options.out)
    existed = holds_run(run_dir)
    barrier(context)
    if existed and not options.resume:
        raise RunExistsError(f"out: {run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_log_file(run_dir) if context.is_main else None
    try:
        return _pretrain(options, context, run_dir)
    finally:
        if handler is not None:
            logging.getLogger("fastvlp").removeHandler(handler)
            handler.close()


def _pretrain(options: PretrainOptions, context: DistributedContext, run_dir: Path) -> PretrainResult:
    threads = configure_threads(context)
    resume_from = ckpt.latest_checkpoint(run_dir) if options.resume else None
    if options.resume and resume_from is None:
        logger.info("--resume: no checkpoint in %s yet, starting the run", run_dir)
    elif resume_from is not None:
        logger.info("resuming from %s", resume_from)

    corpus = read_corpus(Path(options.data), options.exclude_images)
    if options.exclude_images is not None:
        logger.info("left out %d images listed in %s", corpus.excluded, options.exclude_images)
    logger.info("pre-training on %d images; %d records skipped while indexing (%s)", len(corpus.records),
                corpus.skipped_while_indexing, corpus.skip_summary)

    # Tokenizer and label spaces: from the checkpoint when resuming, else built once by rank 0 and saved
    # with the run, so every rank (and every later resume) reads the same files.
    source_dir = resume_from
    if source_dir is None:
        if context.is_main:
            tokenizer = build_tokenizer(corpus, options.vocab)
            tokenizer.save(run_dir / TOKENIZER)
            save_label_spaces(run_dir, *build_label_spaces(Path(options.data), corpus))
        barrier(context)
        source_dir = run_dir
    tokenizer = WordPieceTokenizer.load(source_dir / TOKENIZER)
    classes, attributes, category_map = load_label_spaces(source_dir)

    overrides = dict(
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_id,
        max_text_len=max(tokenizer.max_length, 2),
        num_classes=len(classes),
        num_attributes=len(attributes) if attributes is not None else 0,
    )
    if options.attention_backend is not None:
        overrides["attention_backend"] = options.attention_backend
    if options.matcher_backend is not None:
        overrides["matcher_backend"] = options.matcher_backend
    overrides.update(options.config_overrides)
    config = get_preset(options.preset, **overrides)

    torch.manual_seed(options.seed + context.rank)  # DDP copies rank 0's initial weights to the others
    model = E2EVLP(config)
    if options.backbone_weights is not None:
        model.load_backbone_weights(options.backbone_weights)
    model.to(context.device)
    optimizer = build_optimizer(model)
    warmup = options.warmup_steps if options.warmup_steps is not None else default_warmup_steps(options.max_steps)
    scheduler = build_scheduler(optimizer, warmup, options.max_steps)

    sampler = ResumableBatchSampler(
        len(corpus.records), options.batch_size, seed=options.seed, rank=context.rank, world_size=context.world_size
    )
    trainer: Dict[str, Any] = {
        "step": 0, "nonfinite_skipped": 0, "consecutive_nonfinite": 0, "unreadable_indices": [],
        "samples_seen": 0,
    }
    if resume_from is not None:
        state = ckpt.load_training_files(resume_from, model, optimizer, scheduler)
        saved = state.trainer
        for name, value in (("world_size", context.world_size), ("batch_size", options.batch_size), ("grad_accum", options.grad_accum)):
            if saved.get(name) != value:
                raise ValueError(f"--resume: the run used {name}={saved.get(name)}, this call {value}; keep them equal to resume")
        if saved.get("max_steps") != options.max_steps:
            logger.warning("--resume: max_steps changes from %s to %d: the schedule is stretched", saved.get("max_steps"), options.max_steps)
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
            logger.info("dropped %d metrics lines logged after the checkpoint at step %d", dropped, step)
        info = {
            "preset": options.preset, "config": config.to_dict(), "world_size": context.world_size,
            "device": str(context.device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": threads, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        }
        (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")

    wrapped: torch.nn.Module = model
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    model.train()

    scale = options.scale or ("tiny" if options.preset == "tiny" else "paper")
    dataset = PretrainingSamples(corpus.records, train_transform(scale), classes, attributes, category_map, seed=options.seed)
    batches = _EpochKeyedBatches(sampler)

    def make_loader():
        return DataLoader(
            dataset, batch_sampler=batches, num_workers=options.num_workers, collate_fn=collate_pretraining_samples,
            pin_memory=context.device.type == "cuda", generator=torch.Generator().manual_seed(options.seed),
        )

    builder = BatchBuilder(tokenizer, config.mlm_probability, config.itm_negative_ratio)
    unreadable = set(trainer["unreadable_indices"])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if context.device.type == "cuda" else contextlib.nullcontext()
    )
    clip = config.clip_max_norm if config.clip_max_norm > 0 else float("inf")
    parameters = [p for p in model.parameters() if p.requires_grad]
    backends: Dict[str, Any] = {}
    last_checkpoint = resume_from
    logger.info("steps %d..%d of %d; batch %d x %d micro-batches x %d processes on %s (%d threads)", step + 1,
                stop_step, options.max_steps, options.batch_size, options.grad_accum, context.world_size,
                context.device, threads)

    def save(step_now: int) -> Path:
        trainer_state = {
            **trainer, "step": step_now, "sampler": sampler.state_dict(), "max_steps": options.max_steps,
            "world_size": context.world_size, "batch_size": options.batch_size, "grad_accum": options.grad_accum,
            "seed": options.seed, "preset": options.preset, "unreadable_indices": sorted(unreadable),
        }
        rng = all_gather_objects(ckpt.capture_rng_states(), context)
        path = None
        if context.is_main:
            def write(directory: Path) -> None:
                ckpt.save_training_files(directory, model, optimizer, scheduler, trainer_state,
                                         {f"rank{r}": states for r, states in enumerate(rng)})
                tokenizer.save(directory / TOKENIZER)
                save_label_spaces(directory, classes, attributes, category_map)

            path = ckpt.write_checkpoint(run_dir, step_now, write, options.keep_last)
            logger.info("checkpoint %s", path)
        barrier(context)
        return ckpt.checkpoint_dir(run_dir, step_now)

    progress = None
    if context.is_main and options.progress:
        from tqdm import tqdm

        progress = tqdm(total=options.max_steps, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=1.0)
    running: Dict[str, float] = {}
    logged_backends = False
    loader_iter = iter(make_loader()) if step < stop_step else None
    try:
        while step < stop_step:
            started = time.perf_counter()
            sums = torch.zeros(2 * len(LOSS_KEYS) + 2, dtype=torch.float64)
            new_unreadable: List[int] = []
            for micro in range(options.grad_accum):
                try:
                    collated = next(loader_iter)
                except StopIteration:
                    loader_iter = iter(make_loader())
                    collated = next(loader_iter)
                sampler.advance()
                for index, reason, path in collated["skipped"]:
                    if index not in unreadable:
                        new_unreadable.append(index)
                        logger.warning("skipped an unreadable image (%s): %s", reason, path)
                batch = builder(collated, _step_generator(options.seed, context.rank, step, micro)).to(context.device)
                sync = micro == options.grad_accum - 1 or not context.is_distributed
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    with autocast:
                        output = wrapped(batch)
                    (output.loss / options.grad_accum).backward()
                values = output.losses
                for position, key in enumerate(LOSS_KEYS):
                    value = output.loss if key == "loss" else values.get(key)
                    if value is not None:
                        sums[2 * position] += float(value.detach())
                        sums[2 * position + 1] += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
            sums[-2] = float(grad_norm)
            sums[-1] = len(new_unreadable)
            total = all_reduce_sum(sums.clone(), context)
            if total[-1] > 0:
                for indices in all_gather_objects(new_unreadable, context):
                    unreadable.update(indices)
            trainer["samples_seen"] += options.batch_size * options.grad_accum * context.world_size
            means = {
                key: (float(total[2 * i] / total[2 * i + 1]) if total[2 * i + 1] > 0 else None)
                for i, key in enumerate(LOSS_KEYS)
            }
            finite = means["loss"] is not None and math.isfinite(means["loss"]) and math.isfinite(float(total[-2]))
            lr = group_learning_rate(optimizer, TRANSFORMER_GROUPS)
            lr_backbone = group_learning_rate(optimizer, BACKBONE_GROUPS)
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                trainer["nonfinite_skipped"] += 1
                trainer["consecutive_nonfinite"] += 1
                logger.warning("non-finite loss or gradient (loss %s, grad norm %s) at step %d: update skipped "
                               "(%d skipped so far)", means["loss"], float(total[-2]), step + 1, trainer["nonfinite_skipped"])
                if trainer["consecutive_nonfinite"] >= options.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{trainer['consecutive_nonfinite']} consecutive steps had a non-finite loss or gradient "
                        f"(at step {step + 1}): stopping. Lower the learning rate, check the data, or resume from "
                        f"the last checkpoint ({last_checkpoint})."
                    )
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trainer["step"] = step
            trainer["consecutive_nonfinite"] = 0
            if not backends:
                backends = model.backend_report()
                logger.info("backends: %s", json.dumps(backends))
            elapsed = time.perf_counter() - started
            if context.is_main and (step % options.log_every == 0 or step == stop_step):
                record = {
                    "step": step, **means, "lr": lr, "lr_backbone": lr_backbone,
                    "grad_norm": float(total[-2]) / context.world_size,
                    "skipped_records": corpus.skipped_while_indexing + len(unreadable),
                    "nonfinite_skipped": trainer["nonfinite_skipped"], "epoch": sampler.epoch,
                    "samples_seen": trainer["samples_seen"], "step_time_s": round(elapsed, 4),
                }
                if not logged_backends:  # the first line this process writes says which kernels ran
                    record["backends"] = backends
                    logged_backends = True
                metrics.write(record)
            if progress is not None:
                for key in ("loss", "loss_mlm", "loss_itm", "loss_det", "loss_cap"):
                    if means[key] is not None:
                        running[key] = means[key] if key not in running else 0.9 * running[key] + 0.1 * means[key]
                progress.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in running.items()}, refresh=False)
                progress.update(1)
            if step % options.save_every == 0 or step == stop_step:
                last_checkpoint = save(step)
    finally:
        if progress is not None:
            progress.close()
    if stop_step < options.max_steps:
        logger.info("stopped after step %d of %d (--stop-after): continue with --resume", step, options.max_steps)
    logger.info("done at step %d; %d records skipped, %d non-finite steps skipped; metrics in %s", step,
                corpus.skipped_while_indexing + len(unreadable), trainer["nonfinite_skipped"], run_dir / METRICS)
    return PretrainResult(run_dir, step, ckpt.latest_checkpoint(run_dir), run_dir / METRICS, trainer["nonfinite_skipped"],
                          corpus.skipped_while_indexing + len(unreadable), backends)
