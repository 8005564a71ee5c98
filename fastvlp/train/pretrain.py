"""Pre-training: ``run_pretraining(PretrainOptions(...))`` (the ``fastvlp pretrain`` command).

It reads coco + vg, builds (or, when resuming, reloads) the tokenizer and label spaces, builds the model
and hands them to the shared loop, :func:`fastvlp.train.loop.run_training`.
"""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from fastvlp.data.exclusion import read_excluded_images
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import (ScaleConfig, check_scale, default_scale, scale_config, scale_from_record,
                                     scale_record, train_transform)
from fastvlp.models.backbone import Backbone
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import PRESETS, get_preset
from fastvlp.models.pretraining_batch import PretrainingBatch
from fastvlp.models.static_batch import pad_batch
from fastvlp.train import checkpoint as ckpt
from fastvlp.train.distributed import DistributedContext, barrier, init_distributed
from fastvlp.train.graph_steps import cuda_graph_problem
from fastvlp.train.loop import (
    RESUMABLE_CONFIG_FIELDS,
    LoopOptions,
    NonFiniteLossError,
    RunExistsError,
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
from fastvlp.train.pretrain_data import (
    TOKENIZER,
    BatchBuilder,
    PretrainingSamples,
    build_label_spaces,
    build_tokenizer,
    check_resumed_vocabulary,
    collate_pretraining_samples,
    load_label_spaces,
    read_corpus,
    save_label_spaces,
)
from fastvlp.train.schedule import build_scheduler, default_warmup_steps

__all__ = ["PretrainOptions", "PretrainResult", "run_pretraining", "RunExistsError", "NonFiniteLossError", "LOSS_KEYS"]

LOSS_KEYS = ("loss", "loss_mlm", "loss_itm", "loss_det", "loss_cap", "loss_contrastive")
PretrainResult = TrainingResult


@dataclass
class PretrainOptions:
    """Everything ``fastvlp pretrain`` takes. ``config_overrides`` change the preset (e.g. a smaller
    ``d_model`` for tests); ``scale`` is the images' scale augmentation (a ScaleConfig or a scale name,
    ``paper`` or ``tiny``; default ``tiny`` for the tiny model preset, ``paper`` otherwise), which each
    checkpoint records so that fine-tuning from it keeps it. A resumed run takes its model configuration
    from the checkpoint: ``preset`` and ``config_overrides`` must agree with it, except the attention and
    matcher backends; its tokenizer and weights come from the checkpoint too (``vocab`` and
    ``backbone_weights`` are refused); ``data`` and ``exclude_images`` must give the corpus it started on,
    and ``scale``, when given, the scale it was trained at. ``cuda_graph`` replays each step from a CUDA graph
    on batches padded to ``pad_to`` (height, width; default the scale's ``max_size`` squared), ``max_text_len``
    tokens and ``max_targets`` objects (default the preset's ``num_queries``): :func:`fixed_shape_batches`."""

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
    cuda_graph: bool = False
    max_targets: Optional[int] = None
    pad_to: Optional[Tuple[int, int]] = None

    def validate(self) -> None:
        """Check every option, and read the files they name, before anything is written (ValueError,
        TypeError or FileNotFoundError naming the option)."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)}, got {self.preset!r}")
        validate_loop_options(self)
        device = checked_device(self.device)
        check_config_overrides(get_preset(self.preset), self.config_overrides)
        config = get_preset(self.preset, **_backend_changes(self))
        check_attention_backend(config.attention_backend, device)
        if self.max_targets is not None and (isinstance(self.max_targets, bool) or not isinstance(self.max_targets, int)
                                             or self.max_targets < 1):
            raise ValueError(f"max_targets: expected a positive int, got {self.max_targets!r}")
        if self.pad_to is not None and (not isinstance(self.pad_to, tuple) or len(self.pad_to) != 2 or any(
                isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in self.pad_to)):
            raise ValueError(f"pad_to: expected (height, width), two positive ints, got {self.pad_to!r}")
        if self.cuda_graph:
            problem = cuda_graph_problem(device, self.grad_accum, int(os.environ.get("WORLD_SIZE", "1")),
                                         config.matcher_backend)
            if problem:
                raise ValueError(problem)
        if self.scale is not None:
            check_scale(self.scale)
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps: expected 0..max_steps={self.max_steps}, got {self.warmup_steps!r}")
        for name in ("exclude_images", "backbone_weights", "vocab"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{name}: no such file: {value}")
        if not Path(self.data).is_dir():
            raise FileNotFoundError(f"data: no such directory: {self.data}")
        # The files are read now, not once the run folder holds files: a bad one would leave a run that
        # only --resume could reopen.
        if self.exclude_images is not None:
            try:
                read_excluded_images(self.exclude_images)
            except UnicodeDecodeError as error:
                raise ValueError(f"exclude_images: expected a UTF-8 text file (one image a line), "
                                 f"{self.exclude_images} is not one ({error})") from None
        if self.vocab is not None:
            try:
                WordPieceTokenizer.from_vocab_file(self.vocab)
            except ValueError as error:
                raise _option_error("vocab", error) from None
        if self.backbone_weights is not None:
            with torch.device("meta"):  # the parameter shapes only: no memory, no initialisation
                backbone = Backbone(config.backbone, config.d_model, config.frozen_batch_norm,
                                    config.backbone_frozen_stages, config.backbone_output)
            try:
                backbone.checked_backbone_weights(self.backbone_weights)
            except ValueError as error:
                raise _option_error("backbone_weights", error) from None


def _option_error(option: str, error: Exception) -> ValueError:
    """``error`` as a ValueError naming ``option`` in place of the argument name that starts its message
    (``"path: ..."`` -> ``"vocab: ..."``)."""
    name, sep, rest = str(error).partition(": ")
    return ValueError(f"{option}: {rest if sep and name.isidentifier() else error}")


def run_pretraining(options: PretrainOptions) -> PretrainResult:
    """Pre-train (or resume pre-training) as ``options`` say; returns where the run stopped."""
    if not isinstance(options, PretrainOptions):
        raise TypeError(f"options: expected PretrainOptions, got {type(options).__name__}")
    options.validate()
    context = init_distributed(options.device)
    with run_directory(Path(options.out), options.resume, context) as run_dir:
        return _pretrain(options, context, run_dir)


def _pretrain(options: PretrainOptions, context: DistributedContext, run_dir: Path) -> PretrainResult:
    threads = configure_threads(context)
    resume_from = resume_checkpoint(run_dir, options.resume)
    config = None
    if resume_from is not None:
        check_resumed_vocabulary(options.vocab, resume_from)
        if options.backbone_weights is not None:  # the same command line resumes; say what it does not do
            logger.info("--backbone-weights %s is not read: a resumed run's weights come from %s",
                        options.backbone_weights, resume_from)
        config = _resumed_config(options, resume_from)
        check_attention_backend(config.attention_backend, context.device)  # the checkpoint's, when not given
        scale = _resumed_scale(options, resume_from)
    else:
        scale = options.scale or default_scale(options.preset)
    corpus = read_corpus(Path(options.data), options.exclude_images)
    exclusion = corpus.exclusion
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

    if config is None:
        overrides = dict(
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            max_text_len=max(tokenizer.max_length, 2),
            num_classes=len(classes),
            num_attributes=len(attributes) if attributes is not None else 0,
        )
        overrides.update(_backend_changes(options))
        config = get_preset(options.preset, **overrides)

    torch.manual_seed(options.seed + context.rank)  # DDP copies rank 0's initial weights to the others
    model = E2EVLP(config)
    if options.backbone_weights is not None:
        model.load_backbone_weights(options.backbone_weights)
    model.to(context.device)
    optimizer = build_optimizer(model)
    warmup = options.warmup_steps if options.warmup_steps is not None else default_warmup_steps(options.max_steps)
    logger.info("image scale: %s", scale_record(scale))

    def save_files(directory: Path) -> None:
        tokenizer.save(directory / TOKENIZER)
        save_label_spaces(directory, classes, attributes, category_map)
        # Fine-tuning from the step directory (also where it is copied to) reads the preset and scale here.
        ckpt.write_preset(directory, options.preset, scale_record(scale))

    job = TrainingJob(
        fixed_shapes=fixed_shape_batches(model, scale, options.max_targets or config.num_queries, options.pad_to),
        model=model,
        dataset=PretrainingSamples(corpus.records, train_transform(scale), classes, attributes, category_map,
                                   seed=options.seed),
        collate=collate_pretraining_samples,
        build_batch=(BatchBuilder(tokenizer, config.mlm_probability, config.itm_negative_ratio) if options.cuda_graph
                     else targets_padded_on_host(BatchBuilder(tokenizer, config.mlm_probability,
                                                              config.itm_negative_ratio), model)),
        loss_keys=LOSS_KEYS,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, warmup, options.max_steps),
        save_files=save_files,
        clip_max_norm=config.clip_max_norm,
        skipped_while_indexing=corpus.skipped_while_indexing,
        run_info={
            "task": "pretrain", "preset": options.preset, "config": config.to_dict(), "world_size": context.world_size,
            "device": str(context.device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": threads, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
            "images": len(corpus.records), "exclusion": exclusion,
        },
        corpus={"data": str(Path(options.data).resolve()), "corpus_size": len(corpus.records),
                "exclude_images_sha256": exclusion.get("sha256")},
    )
    loop = LoopOptions(
        max_steps=options.max_steps, stop_after=options.stop_after, batch_size=options.batch_size,
        grad_accum=options.grad_accum, seed=options.seed, warmup_steps=warmup, save_every=options.save_every,
        keep_last=options.keep_last, log_every=options.log_every, num_workers=options.num_workers,
        max_consecutive_nonfinite=options.max_consecutive_nonfinite, progress=options.progress, description="pretrain",
        cuda_graph=options.cuda_graph,
    )
    return run_training(loop, job, context, run_dir, resume_from)


def targets_padded_on_host(build_batch, model: E2EVLP):
    """``build_batch`` followed, where the model matches with the batched solver, by the batch's detection rows
    and targets padded on the host to its own largest object count (:meth:`E2EVLP.static_batch`), without the
    per-image target dicts: the batch then moves to the device in a few copies rather than three an image, and
    the forward reads nothing back from the device. DETR's per-image targets stay for any other matcher."""
    if model.config.matcher_backend != "fastvlp":
        return build_batch

    def build(collated, generator) -> PretrainingBatch:
        batch = build_batch(collated, generator)
        if batch.targets is None:
            return batch
        return dataclasses.replace(model.static_batch(batch, None), targets=None)

    return build


def fixed_shape_batches(model: E2EVLP, scale: Union[str, ScaleConfig], max_targets: int,
                        pad_to: Optional[Tuple[int, int]] = None):
    """What ``--cuda-graph`` replays: a pre-training batch (on the host) moved to the model's device with its images
    padded to ``pad_to`` (default: the largest the scale makes, ``max_size`` square), its texts to
    ``max_text_len`` and its detection targets to ``max_targets`` objects, or None for a batch with a larger
    image, a longer text or more objects in an image. The detection rows and padded targets are made on the
    host, where the labels are; the images are padded on the device, after the copy from pinned memory, which
    on the host would cost a pass over the whole canvas and a copy from pageable memory."""
    canvas = pad_to or (scale_config(scale).max_size,) * 2
    config = model.config

    def fix(batch: PretrainingBatch) -> Optional[PretrainingBatch]:
        lengths = [batch.input_ids.shape[1]] + ([] if batch.caption_ids is None else [batch.caption_ids.shape[1]])
        if batch.images.shape[2] > canvas[0] or batch.images.shape[3] > canvas[1] \
                or max(lengths) > config.max_text_len \
                or max((len(target["labels"]) for target in batch.targets if target is not None), default=0) > max_targets:
            return None
        static = dataclasses.replace(model.static_batch(batch, max_targets), targets=None)  # the graph reads no dicts
        device = next(model.parameters()).device
        return pad_batch(static.to(device, non_blocking=True), canvas, config.max_text_len, config.pad_token_id)

    return fix


def _backend_changes(options: PretrainOptions) -> Dict[str, Any]:
    """The configuration changes of the backend options, then ``config_overrides`` (``--set`` wins)."""
    changes = {name: getattr(options, name) for name in RESUMABLE_CONFIG_FIELDS if getattr(options, name) is not None}
    changes.update(options.config_overrides)
    return changes


def _resumed_scale(options: PretrainOptions, checkpoint: Path) -> Union[str, ScaleConfig]:
    """The image scale ``checkpoint`` was trained at, which a resumed run keeps; another ``scale`` is refused.
    A checkpoint written before checkpoints recorded it has nothing to check against: ``scale`` or the
    preset's default is taken as given."""
    record = ckpt.checkpoint_scale(checkpoint)
    if record is None:
        return options.scale or default_scale(options.preset)
    run_scale = scale_from_record(record, str(checkpoint / ckpt.PRESET_FILE))
    if options.scale is not None and scale_record(options.scale) != scale_record(run_scale):
        raise ValueError(f"--scale: the run was trained at {scale_record(run_scale)!r}, this call gives "
                         f"{scale_record(options.scale)!r}; keep it to resume from {checkpoint}")
    return run_scale


def _resumed_config(options: PretrainOptions, checkpoint: Path) -> E2EVLPConfig:
    """The model configuration of ``checkpoint``, which a resumed run keeps (the vocabulary and label
    spaces that sized it come from the checkpoint too), with this call's backends; a ``preset`` or
    ``config_overrides`` that would change it is refused."""
    preset = ckpt.checkpoint_preset(checkpoint)
    if preset is not None and preset != options.preset:
        raise ValueError(f"--preset: the run was started from {preset!r}, this call gives {options.preset!r}; keep it "
                         f"to resume from {checkpoint}")
    saved = E2EVLPConfig.from_json((checkpoint / "config.json").read_text(encoding="utf-8"))
    return resumed_config(saved, _backend_changes(options))
