"""``fastvlp demo``: synthesise data, pre-train the tiny preset, fine-tune and evaluate VQA and captioning,
and print the results next to the trivial baselines (4 to 12 minutes on 2 CPU cores, with the machine's speed).

``--preset`` and ``--device cuda`` scale it up. The paper's presets keep a frozen-batch-norm ResNet trained
at a tenth of the Transformer's rate, which learns nothing useful from random weights: give them
``--backbone-weights`` (a local torchvision ResNet state dict), and more steps."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from fastvlp.models.presets import list_presets

DEMO_IMAGES = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlp demo",
        description="Synthesise data, pre-train E2E-VLP, fine-tune and evaluate VQA and captioning.",
    )
    parser.add_argument("--out", type=Path, default=Path("fastvlp-demo"), help="demo folder (data in OUT/data)")
    parser.add_argument("--preset", default="tiny", choices=list_presets(),
                        help="model preset (default tiny; the paper's need a GPU)")
    parser.add_argument("--num-images", type=int, default=DEMO_IMAGES, help="synthetic images per data set")
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps")
    parser.add_argument("--vqa-steps", type=int, default=300)
    parser.add_argument("--caption-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8, help="pre-training batch")
    parser.add_argument("--finetune-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="local torchvision ResNet state dict for the backbone (the paper's presets need one)")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="local BERT vocab.txt (default: a vocabulary built from the synthetic captions)")
    parser.add_argument("--resume", action="store_true", help="continue a demo in --out where it stopped")
    return parser


def _check_arguments(args) -> Optional[str]:
    """What is wrong with the arguments (None when nothing is), found before any data is written."""
    for name in ("num_images", "steps", "vqa_steps", "caption_steps", "batch_size", "finetune_batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: expected a positive int"
    for name in ("backbone_weights", "vocab"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            return f"--{name.replace('_', '-')}: no such file: {path}"
    from fastvlp.train.loop import checked_device

    try:
        checked_device(args.device, "--device")
    except ValueError as error:
        return str(error)
    return None


def results_table(results: Dict[str, Dict[str, float]], baselines: Dict[str, Dict[str, float]],
                  question_kinds: Optional[Dict[str, Dict[str, float]]] = None) -> str:
    """The demo's table; ``question_kinds`` (from :func:`fastvlp.eval.question_kinds.accuracy_by_question_kind`)
    adds VQA's accuracy for each kind of synthetic question next to the question-type prior's."""
    lines = [f"{'task':<8} {'metric':<17} {'model':>7}   baseline", "-" * 72]
    vqa = results.get("vqa", {})
    if "accuracy" in vqa:
        base = baselines.get("vqa", {})
        lines.append(f"{'vqa':<8} {'accuracy':<17} {vqa['accuracy']:>7.3f}   most frequent answer "
                     f"{base.get('most_frequent_answer', float('nan')):.3f}, question-type prior "
                     f"{base.get('question_type_prior', float('nan')):.3f}")
        # Per answer type: which kinds of question the model answers better than the question alone does.
        for metric in sorted(m for m in vqa if m.startswith("accuracy_")):
            answer_type = metric[len("accuracy_"):]
            prior = base.get(f"question_type_prior_{answer_type}", float("nan"))
            lines.append(f"{'vqa':<8} {answer_type:<17} {vqa[metric]:>7.3f}   question-type prior {prior:.3f}")
        # Per kind of synthetic question: the answer types mix the background's colour with the objects'.
        for kind, row in (question_kinds or {}).items():
            lines.append(f"{'vqa':<8} {kind.replace(' ', '_'):<17} {row['accuracy']:>7.3f}   question-type prior "
                         f"{row['question_type_prior']:.3f} ({row['questions']} questions)")
    caption = results.get("caption", {})
    for metric in ("cider", "bleu4", "meteor", "rouge_l", "distinct"):
        if metric in caption:
            base = baselines.get("caption", {}).get(metric)
            base_text = "" if base is None else f"most frequent caption {base:.3f}"
            lines.append(f"{'caption':<8} {metric:<17} {caption[metric]:>7.3f}   {base_text}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_arguments(args)
    if problem:  # a usage error, as argparse reports one
        parser.print_usage(sys.stderr)
        print(f"fastvlp demo: error: argument {problem}", file=sys.stderr)
        return 2
    from fastvlp.data.readers.vqa import read_vqa
    from fastvlp.data.synth import write_synthetic_dataset
    from fastvlp.eval.question_kinds import accuracy_by_question_kind
    from fastvlp.inference import Predictor
    from fastvlp.train.finetune import FinetuneOptions, run_finetuning
    from fastvlp.train.loop import NonFiniteLossError, RunExistsError
    from fastvlp.train.loss_plot import plot_runs
    from fastvlp.train.pretrain import PretrainOptions, run_pretraining
    from fastvlp.train.pretrain_cli import configure_console_logging
    from fastvlp.train.tasks.caption import caption_baseline, read_caption_records
    from fastvlp.train.tasks.vqa import vqa_baselines

    configure_console_logging()
    out = Path(args.out)
    data = out / "data"
    if not all((data / name).is_dir() for name in ("coco", "vg", "vqa")):
        print(f"writing {args.num_images} synthetic images (coco, vg, vqa) to {data}")
        write_synthetic_dataset(data, args.num_images, datasets=("coco", "vg", "vqa"))
    try:
        pretrained = run_pretraining(PretrainOptions(
            preset=args.preset, data=data, out=out / "pretrain", max_steps=args.steps, batch_size=args.batch_size,
            device=args.device, save_every=max(1, args.steps // 3), keep_last=2, resume=args.resume,
            backbone_weights=args.backbone_weights, vocab=args.vocab,
        ))
        runs = {}
        for task, steps in (("vqa", args.vqa_steps), ("caption", args.caption_steps)):
            runs[task] = run_finetuning(FinetuneOptions(
                task=task, init=pretrained.checkpoint, data=data, out=out / task, max_steps=steps,
                batch_size=args.finetune_batch_size, device=args.device, save_every=steps, keep_last=1,
                resume=args.resume,
            ))
    except (RunExistsError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
        print(f"fastvlp demo: {error}", file=sys.stderr)
        return 1

    results, baselines, predictions = {}, {}, {}
    for task, run in runs.items():
        evaluation = Predictor.from_checkpoint(run.checkpoint, device=args.device).evaluate(data)
        results[task], predictions[task] = evaluation.metrics, evaluation.predictions
        (out / f"{task}_eval.json").write_text(json.dumps(evaluation.to_dict(), indent=1), encoding="utf-8")
    vqa_train = read_vqa(data / "vqa", data / "coco", "train").records
    vqa_val = read_vqa(data / "vqa", data / "coco", "val").records
    baselines["vqa"] = vqa_baselines(vqa_train, vqa_val)
    try:
        question_kinds = accuracy_by_question_kind(predictions["vqa"] or [], vqa_val, vqa_train)
    except ValueError:  # data of the user's own in OUT/data, not the synthetic grammar's questions
        question_kinds = {}
    baselines["caption"] = caption_baseline(read_caption_records(data, "train").records,
                                            read_caption_records(data, "test").records)
    summary = {"model": results, "baselines": baselines, "vqa_question_kinds": question_kinds}
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plot = out / "loss.png"
    reason = plot_runs({"pre-training": pretrained.metrics_path, "vqa": runs["vqa"].metrics_path,
                        "captioning": runs["caption"].metrics_path}, plot)
    print()
    print(results_table(results, baselines, question_kinds))
    print()
    print(f"results:     {out / 'results.json'}")
    print(f"checkpoints: {out / 'pretrain'}, {out / 'vqa'}, {out / 'caption'} (checkpoints/step-N)")
    print(f"loss plot:   {plot}" if reason is None else reason)
    return 0
