"""Fine-tuning: ``run_finetuning(FinetuneOptions(...))`` (the ``fastvlp finetune`` command).

It starts from a checkpoint directory (``init``: pre-training or another task; its weights load with a
report of the keys that were new and unused) or from a preset's random weights, reads the task's training
data, and runs the shared loop (:func:`fastvlp.train.loop.run_training`): the same metrics.jsonl,
checkpoints, resume, ``--stop-after``, AMP, DDP and progress bar as pre-training. Each checkpoint also
holds ``task.json``.
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import (ScaleConfig, check_scale, default_scale, scale_from_record, scale_record,
                                     train_transform)
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.presets import PRESETS, finetune_lr_drops, finetune_overrides, get_preset
from fastvlp.train import checkpoint as ckpt
from fastvlp.train.distributed import DistributedContext, barrier, init_distributed
from fastvlp.train.loop import (
    RESUMABLE_CONFIG_FIELDS,
    LoopOptions,
    TrainingJob,
    TrainingResult,
    check_attention_backend,
    check_config_overrides,
    checked_device,
    configure_threads,
    logger,
    resume_checkpoint,
    resumed_config,
    run_directory,
    run_training,
    validate_loop_options,
)
from fastvlp.train.optim import build_optimizer
from fastvlp.train.pretrain_data import TOKENIZER, check_resumed_vocabulary
from fastvlp.train.schedule import build_scheduler, default_warmup_steps
from fastvlp.train.tasks import TASK_NAMES, get_task
from fastvlp.train.tasks.base import SeededSamples, StepDecay, collate_task_samples
from fastvlp.train.tasks.weights import load_task_weights

TASK_FILE = "task.json"
CONFIG_FILE = "config.json"
INIT_REPORT = "init_report.json"
# The paper's pre-training rate for the Transformer (section 4.2), the scale of every task's paper rate.
PAPER_PRETRAINING_LR = 1e-4
# The task_options each task reads: another task would ignore them.
TASK_OPTIONS = {"vqa": ("num_answers",), "detection": ("with_text",), "retrieval": ("num_negatives",)}
# Retrieval mines its negatives inside the batch: a single row has none.
MIN_BATCH_SIZE = {"retrieval": 2}


@dataclass
class FinetuneOptions:
    """Everything ``fastvlp finetune`` takes. Exactly one of ``init`` (a checkpoint directory) and ``preset``
    (random weights) is given. ``lr`` overrides the task's default rate: the paper's, scaled by the ratio of
    the model's pre-training rate to the paper's 1e-4 (1 for the paper's presets, 5 for ``tiny``, which
    learns from random weights at 5e-4). The backbone's rate keeps the ratio to it that the model was
    pre-trained with (a tenth for the paper's presets, equal for ``tiny``). ``vocab`` (a BERT vocab.txt) goes
    with ``preset``: an ``init`` checkpoint brings its tokenizer. ``task_options`` are task-specific
    (``num_answers`` for VQA, ``with_text`` for detection, ``num_negatives`` for retrieval); another task's
    are refused. ``scale`` (a ScaleConfig, or ``paper`` or ``tiny``) is the images' scale augmentation; by
    default the one the ``init`` checkpoint records, else the preset's (``tiny`` for tiny). A resumed run
    takes its task, model configuration, tokenizer, task state and scale from the checkpoint: ``task``,
    ``init`` or ``preset``, ``vocab``, ``lr``, ``scale`` and ``config_overrides`` must agree with it, except
    the attention and matcher backends; its ``init`` directory is no longer read."""

    task: str
    data: Path
    out: Path
    init: Optional[Path] = None
    preset: Optional[str] = None
    max_steps: Optional[int] = None
    stop_after: Optional[int] = None
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    resume: bool = False
    save_every: int = 1000
    keep_last: Optional[int] = 3
    log_every: int = 1
    lr: Optional[float] = None
    attention_backend: Optional[str] = None
    matcher_backend: Optional[str] = None
    device: Optional[str] = None
    num_workers: int = 0
    vocab: Optional[Path] = None
    scale: Optional[Union[str, ScaleConfig]] = None
    task_options: Dict[str, Any] = field(default_factory=dict)
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    max_consecutive_nonfinite: int = 5
    progress: bool = True

    def validate(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"task: expected one of {list(TASK_NAMES)}, got {self.task!r}")
        if (self.init is None) == (self.preset is None):
            raise ValueError("init, preset: give exactly one (a checkpoint directory to start from, or a preset)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)}, got {self.preset!r}")
        # A resumed run reads nothing from its init directory, which may have moved since; a --resume that
        # finds no checkpoint yet checks it when it starts the run.
        if self.init is not None and not self.resume:
            _init_config(Path(self.init))
        task = get_task(self.task)
        if self.max_steps is None:
            self.max_steps = task.default_max_steps
        validate_loop_options(self)
        if self.task in MIN_BATCH_SIZE and self.batch_size < MIN_BATCH_SIZE[self.task]:
            raise ValueError(f"batch_size: expected at least {MIN_BATCH_SIZE[self.task]} for {self.task} (its "
                             f"negatives come from the same batch), got {self.batch_size}")
        device = checked_device(self.device)
        if not isinstance(self.task_options, dict):
            raise TypeError(f"task_options: expected a dict, got {type(self.task_options).__name__}")
        for key in self.task_options:
            if key not in TASK_OPTIONS.get(self.task, ()):
                owner = next((name for name, keys in TASK_OPTIONS.items() if key in keys), None)
                if owner is None:
                    raise ValueError(f"task_options: expected options of {self.task} "
                                     f"({list(TASK_OPTIONS.get(self.task, ()))}), got {key!r}")
                raise ValueError(f"{key}: expected only with task {owner!r}, got it with task {self.task!r}")
        task.validate_options(self.task_options)
        base = None
        if self.preset is not None:
            base = get_preset(self.preset)
        elif (Path(self.init) / CONFIG_FILE).is_file():
            base = _checkpoint_config(Path(self.init))
        if base is not None:
            check_config_overrides(base, self.config_overrides)
            backend = _config_changes(self).get("attention_backend", base.attention_backend)
            check_attention_backend(backend, device)
        if self.scale is not None:
            check_scale(self.scale)
        if self.lr is not None and not (isinstance(self.lr, float) and self.lr > 0):
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if self.vocab is not None and self.init is not None:
            raise ValueError(f"vocab: expected only with preset (the init checkpoint {self.init} brings its "
                             f"tokenizer), got {self.vocab}")
        if self.vocab is not None and not Path(self.vocab).is_file():
            raise FileNotFoundError(f"vocab: no such file: {self.vocab}")
        if not Path(self.data).is_dir():
            raise FileNotFoundError(f"data: no such directory: {self.data}")


def read_task_file(directory: Path) -> Dict[str, Any]:
    path = Path(directory) / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {directory} holds no {TASK_FILE}; is it a fine-tuned checkpoint?")
    return json.loads(path.read_text(encoding="utf-8"))


# What task.json says about the run rather than about the task's heads.
_RUN_KEYS = ("task", "preset", "pretraining_rates", "scale")


def saved_task_state(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """The task state (answer vocabulary, category map, ...) of a ``task.json``'s contents."""
    return {key: value for key, value in saved.items() if key not in _RUN_KEYS}


def saved_scale(saved: Mapping[str, Any]) -> Union[str, ScaleConfig]:
    """The image scale the checkpoint was fine-tuned at: a scale name or a :class:`ScaleConfig`; for a
    ``task.json`` written before it held one, the default scale of its preset."""
    scale = saved.get("scale")
    if scale is None:
        return default_scale(saved.get("preset"))
    return scale_from_record(scale, TASK_FILE)


def source_scale(checkpoint: Path) -> Union[str, ScaleConfig]:
    """The image scale a checkpoint's model was trained at: a fine-tuned checkpoint's ``task.json`` says, a
    pre-training checkpoint's ``preset.json``; for a checkpoint written before they recorded it, the default
    scale of its preset."""
    checkpoint = Path(checkpoint)
    if (checkpoint / TASK_FILE).is_file():
        return saved_scale(read_task_file(checkpoint))
    record = ckpt.checkpoint_scale(checkpoint)
    if record is None:
        return default_scale(ckpt.checkpoint_preset(checkpoint))
    return scale_from_record(record, str(checkpoint / ckpt.PRESET_FILE))


def run_finetuning(options: FinetuneOptions) -> TrainingResult:
    """Fine-tune (or resume fine-tuning) as ``options`` say; returns where the run stopped."""
    if not isinstance(options, FinetuneOptions):
        raise TypeError(f"options: expected FinetuneOptions, got {type(options).__name__}")
    options.validate()
    context = init_distributed(options.device)
    with run_directory(Path(options.out), options.resume, context) as run_dir:
        return _finetune(options, context, run_dir)


def default_task_lr(task, pretraining_lr: float) -> float:
    """The task's paper rate, scaled as the model's pre-training rate was scaled from the paper's (as it is,
    for a task whose ``scale_paper_lr`` is False)."""
    if not task.scale_paper_lr:
        return task.paper_lr
    return task.paper_lr * pretraining_lr / PAPER_PRETRAINING_LR


def _checkpoint_config(checkpoint: Path) -> E2EVLPConfig:
    return E2EVLPConfig.from_json((Path(checkpoint) / CONFIG_FILE).read_text(encoding="utf-8"))


def _init_config(init: Path) -> E2EVLPConfig:
    """The model configuration of the ``init`` checkpoint directory; FileNotFoundError naming ``init`` when it
    is not one."""
    if not (Path(init) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"init: {init} is not a checkpoint directory (no {CONFIG_FILE})")
    return _checkpoint_config(Path(init))


def _run_init(run_dir: Path) -> Optional[str]:
    """The ``init`` a run was started from, as given then: its ``init_report.json`` (written once, at the start)
    says, else its ``run.json``; None for a run started from a preset."""
    for name in (INIT_REPORT, ckpt.RUN_INFO):
        path = Path(run_dir) / name
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("init")
    return None


def _check_resumed_start(options: FinetuneOptions, run_dir: Path, checkpoint: Path,
                         saved_task: Dict[str, Any]) -> None:
    """Refuse an ``init``, ``preset`` or ``vocab`` other than the run's: a resumed run restores its weights and
    tokenizer from ``checkpoint`` and would silently ignore them."""
    started_from = _run_init(run_dir)
    run_start = f"--init {started_from}" if started_from is not None else f"--preset {saved_task.get('preset')}"
    if options.init is not None and (started_from is None
                                     or Path(started_from).resolve() != Path(options.init).resolve()):
        raise ValueError(f"--init: the run was started from {run_start}, this call gives --init {options.init}; keep "
                         f"it to resume from {checkpoint}, or choose another --out")
    if options.preset is not None and (started_from is not None or saved_task.get("preset") != options.preset):
        raise ValueError(f"--preset: the run was started from {run_start}, this call gives --preset {options.preset}; "
                         f"keep it to resume from {checkpoint}, or choose another --out")
    check_resumed_vocabulary(options.vocab, checkpoint)


def _config_changes(options: FinetuneOptions) -> Dict[str, Any]:
    """The configuration changes of the backend options, then ``config_overrides`` (``--set`` wins)."""
    changes = {name: getattr(options, name) for name in RESUMABLE_CONFIG_FIELDS if getattr(options, name) is not None}
    changes.update(options.config_overrides)
    return changes


def _task_config(options: FinetuneOptions, task, base: E2EVLPConfig, preset_lr: float, preset_lr_backbone: float,
                 preset_name: Optional[str]) -> E2EVLPConfig:
    """The task's rates, then the preset's changes for the task (``finetune_overrides``), then the options'."""
    lr = options.lr if options.lr is not None else default_task_lr(task, preset_lr)
    changes: Dict[str, Any] = {"lr": lr, "lr_backbone": lr * preset_lr_backbone / preset_lr}
    option_changes = _config_changes(options)
    preset_changes = {name: value for name, value in finetune_overrides(preset_name, task.name).items()
                      if name not in option_changes}
    if preset_changes:
        logger.info("%s's fine-tuning for %s sets %s", preset_name, task.name,
                    ", ".join(f"{name}={value}" for name, value in preset_changes.items()))
    return base.replace(**{**changes, **preset_changes, **option_changes})


def _resumed_task_config(options: FinetuneOptions, task, run_dir: Path, checkpoint: Path,
                         saved_task: Dict[str, Any]) -> E2EVLPConfig:
    """The model configuration of ``checkpoint``, which a resumed run keeps, with this call's backends; a
    ``task``, ``init``, ``preset``, ``vocab``, ``lr`` or ``config_overrides`` that would change the run is
    refused."""
    if saved_task.get("task") != task.name:
        raise ValueError(f"--task: the run fine-tunes {saved_task.get('task')!r}, this call gives {task.name!r}; keep it to "
                         f"resume from {checkpoint}, or choose another --out")
    _check_resumed_start(options, run_dir, checkpoint, saved_task)
    config = resumed_config(_checkpoint_config(checkpoint), _config_changes(options))
    check_attention_backend(config.attention_backend, options.device)  # the checkpoint's, when not given
    # The optimizer's saved rates replace the configuration's on resume: another --lr would be ignored.
    if options.lr is not None and options.lr != config.lr:
        raise ValueError(f"--lr: the run was started with {config.lr}, this call gives {options.lr}; keep it to resume "
                         f"from {checkpoint}")
    return config


def _finetune(options: FinetuneOptions, context: DistributedContext, run_dir: Path) -> TrainingResult:
    threads = configure_threads(context)
    task = get_task(options.task)
    resume_from = resume_checkpoint(run_dir, options.resume)
    # A resumed run's files (config, tokenizer, task state) come from the checkpoint, checked before the data
    # is read.
    if resume_from is not None:
        saved = read_task_file(resume_from)
        config = _resumed_task_config(options, task, run_dir, resume_from, saved)
    elif options.init is not None:
        # validate() left a --resume's init unchecked; with no checkpoint to resume, the run starts from it.
        base = _init_config(Path(options.init))
        check_config_overrides(base, options.config_overrides)
    data = task.read_training_data(Path(options.data), options.task_options)
    if not data.records:
        raise ValueError(f"data: no {task.name} training records under {options.data} ({data.skips.summary()})")
    logger.info("fine-tuning %s on %d records; %d skipped while reading (%s)", task.name, len(data.records),
                data.skips.total, data.skips.summary())

    preset_name = options.preset
    if resume_from is not None:
        tokenizer = WordPieceTokenizer.load(resume_from / TOKENIZER)
        preset_name, source_rates = saved.get("preset"), tuple(saved["pretraining_rates"])
        task_state = saved_task_state(saved)
        # The saved state (answer vocabulary, category map, negatives per pair) is what the heads were built
        # for; one rebuilt differently from this call's data or options would be silently ignored.
        changed = sorted(key for key in set(task_state) | set(data.task_state)
                         if task_state.get(key) != data.task_state.get(key))
        if changed:
            raise ValueError(f"--resume: the task state built from --data and this call's options differs from "
                             f"the run's in {changed} (e.g. another --num-answers or --num-negatives, or other "
                             f"data); keep them to resume from {resume_from}, or choose another --out")
    else:
        if options.init is not None:
            tokenizer = WordPieceTokenizer.load(Path(options.init) / TOKENIZER)
            source_rates = _pretraining_rates(Path(options.init), base)
            preset_name = source_preset(Path(options.init))
            if preset_name is None:
                logger.warning("%s does not say which preset its model came from: the paper's image scale is used",
                               options.init)
        else:
            if options.vocab is not None:
                tokenizer = WordPieceTokenizer.from_vocab_file(options.vocab)
            else:
                tokenizer = WordPieceTokenizer.train_on_texts(task.tokenizer_texts(data.records))
            base = get_preset(preset_name, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                              max_text_len=max(tokenizer.max_length, 2))
            source_rates = (base.lr, base.lr_backbone)
        config = _task_config(options, task, base, *source_rates, preset_name)
        task_state = data.task_state

    torch.manual_seed(options.seed + context.rank)  # DDP copies rank 0's initial weights to the others
    model = task.build_model(config, task_state)
    init_report = None
    if resume_from is None and options.init is not None:
        init_report = load_task_weights(model, Path(options.init))
        logger.info("weights from %s: %s", options.init, init_report.summary())
        if context.is_main:
            (run_dir / INIT_REPORT).write_text(json.dumps({"init": str(options.init), **init_report.to_dict()}, indent=1),
                                               encoding="utf-8")
    model.to(context.device)
    optimizer = build_optimizer(model)
    if task.decay_milestones is not None:
        warmup = 0
        milestones = finetune_lr_drops(preset_name, task.name) or task.decay_milestones
        if milestones != task.decay_milestones:
            logger.info("%s's fine-tuning for %s drops the rate tenfold after %s of the run", preset_name, task.name,
                        ", ".join(f"{m:g}" for m in milestones))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepDecay(milestones, options.max_steps))
    else:
        warmup = default_warmup_steps(options.max_steps)
        scheduler = build_scheduler(optimizer, warmup, options.max_steps)

    if options.scale is not None:
        scale = options.scale
    elif options.init is not None and resume_from is None:
        scale = source_scale(Path(options.init))  # the scale the init checkpoint's model learnt at
    else:
        scale = default_scale(preset_name)
    if resume_from is not None:
        run_scale = saved_scale(saved)
        if options.scale is not None and scale_record(options.scale) != scale_record(run_scale):
            raise ValueError(f"--resume: scale {options.scale!r} differs from the run's {run_scale!r}; keep it to "
                             f"resume from {resume_from}, or choose another --out")
        scale = run_scale
    task_file = json.dumps({"task": task.name, "preset": preset_name, "pretraining_rates": list(source_rates),
                            "scale": scale_record(scale), **task_state}, indent=1)

    def save_files(directory: Path) -> None:
        tokenizer.save(directory / TOKENIZER)
        (directory / TASK_FILE).write_text(task_file, encoding="utf-8")

    job = TrainingJob(
        model=model,
        dataset=SeededSamples(task.training_dataset(data.records, train_transform(scale), task_state), options.seed),
        collate=collate_task_samples,
        build_batch=lambda collated, generator: task.build_batch(collated, tokenizer, generator),
        loss_keys=task.loss_keys,
        optimizer=optimizer,
        scheduler=scheduler,
        save_files=save_files,
        clip_max_norm=config.clip_max_norm,
        skipped_while_indexing=data.skips.total,
        run_info={
            "task": task.name, "init": None if options.init is None else str(options.init), "preset": preset_name,
            "config": config.to_dict(), "scale": scale_record(scale),
            "world_size": context.world_size, "device": str(context.device), "torch": torch.__version__,
            "python": platform.python_version(), "threads": threads,
            "init_report": None if init_report is None else init_report.summary(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        },
    )
    loop = LoopOptions(
        max_steps=options.max_steps, stop_after=options.stop_after, batch_size=options.batch_size,
        grad_accum=options.grad_accum, seed=options.seed, warmup_steps=warmup, save_every=options.save_every,
        keep_last=options.keep_last, log_every=options.log_every, num_workers=options.num_workers,
        max_consecutive_nonfinite=options.max_consecutive_nonfinite, progress=options.progress,
        description=f"finetune {task.name}",
    )
    barrier(context)
    return run_training(loop, job, context, run_dir, resume_from)


def source_preset(checkpoint: Path) -> Optional[str]:
    """The preset a checkpoint's model came from: a fine-tuned checkpoint's ``task.json`` says, a
    pre-training checkpoint's ``preset.json`` (or, written before it held one, its run's ``run.json``)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / TASK_FILE).is_file():
        return read_task_file(checkpoint).get("preset")
    return ckpt.checkpoint_preset(checkpoint)


def _pretraining_rates(checkpoint: Path, config: E2EVLPConfig):
    """The learning rates of the checkpoint's pre-training, whose ratio the task's backbone rate keeps: a
    fine-tuned checkpoint's config holds its own task's rates, so its ``task.json`` remembers these."""
    if (checkpoint / TASK_FILE).is_file():
        rates = read_task_file(checkpoint).get("pretraining_rates")
        if rates:
            return float(rates[0]), float(rates[1])
    return config.lr, config.lr_backbone
