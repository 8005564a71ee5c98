"""Inference speed of E2E-VLP, attention backend "fastvlp" against "torch" with the same weights: caption
generation (beam search, with and without the key/value cache) and VQA answering.

* Captioning times :func:`fastvlp.models.generation.generate_captions` from pixels (backbone, image-only
  encoder pass, then decoding), in generated caption tokens per second and ms per batch. Random weights
  would often end a caption early at the end token, so both models get the same end-token logit bias of
  -inf: every caption is exactly ``max_length`` tokens, and the tokens are counted from the returned
  captions. Beam search decodes ``num_beams`` rows per image; the count is of the returned tokens.
  Without the cache every step re-runs the decoder with the model's own attention modules. With it,
  :class:`fastvlp.models.caption_cache.IncrementalCaptionDecoder` decodes one token a step through the
  backend's attention: fastvlp's dispatcher, or torch's ``scaled_dot_product_attention`` for the torch
  backend (``cached_step_attention`` in each row).
* VQA times backbone + ``encode(image, question)`` + :class:`fastvlp.models.task_heads.VqaHead` on [CLS]
  (3129 answers), in questions per second and ms per batch.

Inputs are random pixels and token ids of a realistic size: what inference costs does not depend on what
the pixels show.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.bench.common import (
    MIN_CUDA_WARMUP_S, device_error, device_name, min_warmup_seconds, result_row, spin_up,
    unsettled_rows_note, warm_up, write_results,
)

# Token ids 0..4 play [PAD], [UNK], [CLS], [SEP], [MASK] (BERT's order in the synthetic vocabulary).
PAD, CLS, SEP = 0, 2, 3
FIRST_WORD_ID = 5
NUM_VQA_ANSWERS = 3129
DEFAULT_IMAGE_SIZES = {"tiny": (128, 160)}
PAPER_IMAGE_SIZE = (800, 1216)
# In float32, two backends' answer logits (same weights, same inputs) agree to this share of their magnitude.
VQA_LOGIT_TOLERANCE = 1e-3


def default_image_size(preset: str) -> Tuple[int, int]:
    """128x160 for ``tiny``; 800x1216 (short side 800, the paper's test scale) for the paper presets."""
    return DEFAULT_IMAGE_SIZES.get(preset, PAPER_IMAGE_SIZE)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def time_calls(call: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> List[float]:
    """Wall time in ms of each of ``repeats`` calls, synchronised on CUDA, after at least ``warmup`` calls
    (and, on CUDA, :data:`MIN_CUDA_WARMUP_S` seconds of them)."""
    warm_up(lambda index: call(), warmup, min_warmup_seconds(device), lambda: _synchronize(device))
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def exact_precision(device: torch.device) -> bool:
    """Whether the backends compute in IEEE float32 here, so that their outputs must agree: on the CPU, and
    on CUDA unless matmuls may use TF32. (cuDNN's TF32 convolutions run the same way for every backend, on
    the same pixels, so they make no difference between backends.)"""
    return device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32


def build_models(preset: str, backends: Sequence[str], device: torch.device, seed: int):
    """One model per attention backend, all with the first one's weights, the end token's caption logit
    at -inf, in evaluation mode; and one VQA head."""
    from fastvlp.models.e2e_vlp import E2EVLP
    from fastvlp.models.task_heads import VqaHead

    torch.manual_seed(seed)
    models: Dict[str, torch.nn.Module] = {}
    for backend in backends:
        model = E2EVLP.from_preset(preset, attention_backend=backend)
        if models:
            model.load_state_dict(copy.deepcopy(next(iter(models.values())).state_dict()))
        else:
            with torch.no_grad():
                model.caption_head.bias[SEP] = float("-inf")
        models[backend] = model.to(device).eval()
    vqa_head = VqaHead(models[backends[0]].config.d_model, NUM_VQA_ANSWERS).to(device).eval()
    return models, vqa_head


def random_inputs(config, batch: int, height: int, width: int, question_length: int, device, seed: int):
    """Unpadded random images ``[B, 3, H, W]`` with their pixel mask, and full-length questions
    ``[CLS] words [SEP]``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    ids = torch.randint(FIRST_WORD_ID, config.vocab_size, (batch, question_length), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones(batch, question_length, dtype=torch.bool)
    return images.to(device), pixel_mask.to(device), ids.to(device), mask.to(device)


@dataclass
class Inputs:
    """What every row of one run shares: the device, the timing's repeats and warm-up, the shape's label,
    and the images and questions."""
    device: torch.device
    repeats: int
    warmup: int
    shape: str
    images: torch.Tensor
    pixel_mask: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor


CAPTION_MODES = ("cache", "no-cache", "cuda-graph")


def caption_row(model, backend: str, inputs: Inputs, max_length: int, num_beams: int, mode: str):
    """A captioning row of ``model`` and the captions it returned. ``mode``: ``"cache"`` (the growing
    key/value cache), ``"no-cache"`` or ``"cuda-graph"`` (fixed-size caches, each call capturing its step
    once and replaying it for every token: the capture is in the timing)."""
    from fastvlp.models.generation import generate_captions

    if mode not in CAPTION_MODES:
        raise ValueError(f"mode: expected one of {CAPTION_MODES}, got {mode!r}")
    use_cache = mode != "no-cache"

    def caption():
        return generate_captions(model, inputs.images, inputs.pixel_mask, bos_id=CLS, eos_id=SEP, pad_id=PAD,
                                 max_length=max_length, num_beams=num_beams, use_cache=use_cache,
                                 cuda_graph=mode == "cuda-graph")

    with torch.inference_mode():
        timings = time_calls(caption, inputs.repeats, inputs.warmup, inputs.device)
        captions = caption()
    tokens = sum(len(tokens) for tokens in captions)
    row = result_row(f"caption-beam{num_beams}-{mode}", backend, f"{inputs.shape} len{max_length}", timings,
                     device=inputs.device.type, batch_size=len(captions), max_length=max_length, num_beams=num_beams,
                     use_cache=use_cache, cuda_graph=mode == "cuda-graph", generated_tokens=tokens,
                     attention=model.backend_report()["attention"])
    if use_cache:
        row["cached_step_attention"] = (
            "torch.nn.functional.scaled_dot_product_attention" if backend == "torch" else "fastvlp.ops.fmha.dispatch"
        )
    row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
    return row, captions


def vqa_row(model, backend: str, vqa_head, inputs: Inputs):
    """A VQA row of ``model`` and its answer logits (float32)."""
    def answer():
        encoded = model.encode(inputs.images, inputs.pixel_mask, inputs.question_ids, inputs.question_mask)
        return vqa_head(encoded.cls_hidden)

    with torch.inference_mode():
        timings = time_calls(answer, inputs.repeats, inputs.warmup, inputs.device)
        logits = answer().float()
    batch, question_length = inputs.question_ids.shape
    row = result_row("vqa", backend, f"{inputs.shape} q{question_length}", timings, device=inputs.device.type,
                     batch_size=batch, question_length=question_length, num_answers=NUM_VQA_ANSWERS,
                     attention=model.backend_report()["attention"])
    row["questions_per_s"] = batch / (row["median_ms"] / 1e3)
    return row, logits


def compare_captions(row, captions, first_captions, first_backend: str, exact: bool) -> None:
    """Record which share of ``captions`` equals the first backend's; in exact precision, a difference
    is a wrong result (same weights, same pixels)."""
    equal = sum(a == b for a, b in zip(captions, first_captions))
    row["captions_equal_to_first_backend"] = equal / max(len(captions), 1)
    if exact and equal < len(captions):
        row["status"] = (f"wrong result: {len(captions) - equal} of {len(captions)} captions differ from "
                         f"{first_backend}'s in float32")


def compare_answers(row, logits, first_logits, first_backend: str, exact: bool) -> None:
    """Record the largest answer-logit difference to the first backend's; in exact precision, one above
    :data:`VQA_LOGIT_TOLERANCE` of the logits' magnitude is a wrong result."""
    difference = float((logits - first_logits).abs().max())
    row["max_abs_logit_diff_to_first_backend"] = difference
    if exact and difference > VQA_LOGIT_TOLERANCE * max(1.0, float(first_logits.abs().max())):
        row["status"] = f"wrong result: answer logits differ from {first_backend}'s by {difference:.3g} in float32"




def describe_row(row: Dict[str, object]) -> str:
    """One printed line: time, rate, agreement with the first backend, and any warning."""
    if "tokens_per_s" in row:
        rate = f"{row['tokens_per_s']:9.1f} tokens/s"
        agreement = f"captions equal to the first backend's: {row['captions_equal_to_first_backend']:.0%}"
    else:
        rate = f"{row['questions_per_s']:9.1f} questions/s"
        agreement = f"max |logit diff| to the first backend: {row['max_abs_logit_diff_to_first_backend']:.2g}"
    return (f"  {row['name']:<24} {row['contender']:<8} {row['median_ms']:9.1f} ms/batch  {rate}  {agreement}"
            + unsettled_rows_note([row]) + (f"  {row['status']}" if "status" in row else ""))


def describe_ratios(rows: Sequence[Dict[str, object]]) -> List[str]:
    """The first backend's speed-up over each later one (their time over its time), for one measurement."""
    first = rows[0]
    return [f"  {first['name']}: {first['contender']}'s speed-up over {row['contender']}: "
            f"{row['median_ms'] / first['median_ms']:.2f}x" + unsettled_rows_note([first, row]) for row in rows[1:]]


def run(preset: str = "tiny", batch_size: int = 8, max_length: int = 20, num_beams: int = 4, repeats: int = 5,
        warmup: int = 2, device: str = "cpu", backends: Sequence[str] = ("fastvlp", "torch"),
        image_size: Optional[Tuple[int, int]] = None, question_length: int = 20, seed: int = 0) -> List[Dict[str, object]]:
    """Rows of the measurements (captions with and without the cache, on CUDA also with the cached step
    replayed from a CUDA graph, and VQA) for every backend, each compared with the first backend's output.
    The backends take turns going first from one measurement to the next, so that no backend is always the
    one timed first."""
    device = torch.device(device)
    backends = list(backends)
    models, vqa_head = build_models(preset, backends, device, seed)
    config = models[backends[0]].config
    if not 2 <= question_length <= config.max_text_len:
        raise ValueError(f"question_length: expected an int in [2, max_text_len={config.max_text_len}], got {question_length!r}")
    height, width = image_size or default_image_size(preset)
    inputs = Inputs(device, repeats, warmup, f"{preset} B{batch_size} {height}x{width}",
                    *random_inputs(config, batch_size, height, width, question_length, device, seed))
    exact = exact_precision(device)
    spin_up(device)  # before the first contender, which would otherwise be timed while the GPU's clocks rise
    first = backends[0]
    rows: List[Dict[str, object]] = []
    modes = ("cache", "no-cache") + (("cuda-graph",) if device.type == "cuda" else ()) + ("vqa",)
    for turn, mode in enumerate(modes):
        order = backends if turn % 2 == 0 else backends[::-1]
        if mode == "vqa":
            measured = {backend: vqa_row(models[backend], backend, vqa_head, inputs) for backend in order}
        else:
            measured = {backend: caption_row(models[backend], backend, inputs, max_length, num_beams, mode)
                        for backend in order}
        for backend in backends:
            row, output = measured[backend]
            compare = compare_answers if mode == "vqa" else compare_captions
            compare(row, output, measured[first][1], first, exact)
            rows.append(row)
            print(describe_row(row))
        print("\n".join(describe_ratios(rows[-len(backends):])))
    return rows


# The backbone downsamples 32 times: a smaller side leaves it no feature map.
MIN_IMAGE_SIDE = 32


def _parse_size(text: str) -> Tuple[int, int]:
    height, width = (int(side) for side in text.lower().split("x"))
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(text)
    return height, width




def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from fastvlp.models.presets import PRESETS, get_preset
    from fastvlp.nn.transformer_layers import ATTENTION_BACKENDS

    parser = argparse.ArgumentParser(prog="fastvlp bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=20, help="caption tokens generated per image")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (from 6 on, rows get a drift figure)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls per row, at least 1 (on a GPU, for at least "
                             f"{MIN_CUDA_WARMUP_S:g} s as well)")
    parser.add_argument("--image-size", default=None, help="HxW (default: 128x160 for tiny, 800x1216 otherwise)")
    parser.add_argument("--question-length", type=int, default=20, help="VQA question tokens with [CLS] and [SEP]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="fastvlp,torch",
                        help=f"comma-separated attention backends, of {', '.join(ATTENTION_BACKENDS)}")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    image_size = None
    if args.image_size is not None:
        try:
            image_size = _parse_size(args.image_size)
        except ValueError:
            parser.error(f"--image-size must look like 800x1216, sides of at least {MIN_IMAGE_SIDE}, "
                         f"got {args.image_size!r}")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if not backends or len(set(backends)) != len(backends) or not set(backends) <= set(ATTENTION_BACKENDS):
        parser.error(f"--backends must name distinct backends of {', '.join(ATTENTION_BACKENDS)}, got {args.backends!r}")
    if min(args.batch_size, args.max_length, args.num_beams, args.repeats) < 1:
        parser.error("--batch-size, --max-length, --num-beams and --repeats must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: fastvlp's kernels compile and autotune on their first call, "
                     "which the warm-up keeps out of the timing")
    max_text_len = get_preset(args.preset).max_text_len
    if not 2 <= args.question_length <= max_text_len:
        parser.error(f"--question-length must be in 2..{max_text_len} ([CLS] and [SEP] included; the preset's "
                     f"learned text positions)")
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    height, width = image_size or default_image_size(args.preset)
    device = device_name(args.device)
    print(f"generation and VQA inference, {args.preset}, batch {args.batch_size}, {height}x{width}, on {device}:")
    if args.repeats < 6:
        print(f"  ({args.repeats} repeats: too few for a drift figure, so unsettled rows cannot be told)")
    rows = run(args.preset, args.batch_size, args.max_length, args.num_beams, args.repeats, args.warmup, args.device,
               backends, (height, width), args.question_length)
    path = write_results(
        "generation", rows, device, args.out_dir,
        extra={"preset": args.preset, "image_size": f"{height}x{width}", "backends": backends,
               "repeats": args.repeats, "warmup": args.warmup, "min_warmup_s": min_warmup_seconds(torch.device(args.device))},
        table_columns=("name", "contender", "shape", "median_ms", "p10_ms", "p90_ms", "drift", "tokens_per_s",
                       "questions_per_s", "attention"),
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
