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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.bench.common import device_name, result_row, write_results

# Token ids 0..4 play [PAD], [UNK], [CLS], [SEP], [MASK] (BERT's order in the synthetic vocabulary).
PAD, CLS, SEP = 0, 2, 3
FIRST_WORD_ID = 5
NUM_VQA_ANSWERS = 3129
DEFAULT_IMAGE_SIZES = {"tiny": (128, 160)}
PAPER_IMAGE_SIZE = (800, 1216)


def default_image_size(preset: str) -> Tuple[int, int]:
    """128x160 for ``tiny``; 800x1216 (short side 800, the paper's test scale) for the paper presets."""
    return DEFAULT_IMAGE_SIZES.get(preset, PAPER_IMAGE_SIZE)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> List[float]:
    """Wall time in ms of each of ``repeats`` calls after ``warmup`` ones, synchronised on CUDA."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


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


def run(preset: str = "tiny", batch_size: int = 8, max_length: int = 20, num_beams: int = 4, repeats: int = 5,
        warmup: int = 2, device: str = "cpu", backends: Sequence[str] = ("fastvlp", "torch"),
        image_size: Optional[Tuple[int, int]] = None, question_length: int = 20, seed: int = 0) -> List[Dict[str, object]]:
    from fastvlp.models.generation import generate_captions

    device = torch.device(device)
    models, vqa_head = build_models(preset, list(backends), device, seed)
    config = next(iter(models.values())).config
    if not 2 <= question_length <= config.max_text_len:
        raise ValueError(f"question_length: expected an int in [2, max_text_len={config.max_text_len}], got {question_length!r}")
    height, width = image_size or default_image_size(preset)
    images, pixel_mask, question_ids, question_mask = random_inputs(
        config, batch_size, height, width, question_length, device, seed
    )
    shape = f"{preset} B{batch_size} {height}x{width}"
    rows: List[Dict[str, object]] = []
    first_captions: Dict[bool, List[List[int]]] = {}
    first_answers: Optional[torch.Tensor] = None

    for backend, model in models.items():
        for use_cache in (True, False):
            def caption(model=model, use_cache=use_cache):
                return generate_captions(model, images, pixel_mask, bos_id=CLS, eos_id=SEP, pad_id=PAD,
                                         max_length=max_length, num_beams=num_beams, use_cache=use_cache)

            with torch.inference_mode():
                timings = time_calls(caption, repeats, warmup, device)
                captions = caption()
            tokens = sum(len(tokens) for tokens in captions)
            first_captions.setdefault(use_cache, captions)
            same = sum(a == b for a, b in zip(captions, first_captions[use_cache])) / max(len(captions), 1)
            name = f"caption-beam{num_beams}-" + ("cache" if use_cache else "no-cache")
            row = result_row(name, backend, f"{shape} len{max_length}", timings, device=device.type,
                             batch_size=batch_size, max_length=max_length, num_beams=num_beams, use_cache=use_cache,
                             generated_tokens=tokens, attention=model.backend_report()["attention"],
                             captions_equal_to_first_backend=same)
            if use_cache:
                row["cached_step_attention"] = (
                    "torch.nn.functional.scaled_dot_product_attention" if backend == "torch" else "fastvlp.ops.fmha.dispatch"
                )
            row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
            rows.append(row)
            print(f"  {name:<24} {backend:<8} {row['median_ms']:9.1f} ms/batch  {row['tokens_per_s']:9.1f} tokens/s")

        def answer(model=model):
            encoded = model.encode(images, pixel_mask, question_ids, question_mask)
            return vqa_head(encoded.cls_hidden)

        with torch.inference_mode():
            timings = time_calls(answer, repeats, warmup, device)
            logits = answer().float()
        if first_answers is None:
            first_answers = logits
        row = result_row("vqa", backend, f"{shape} q{question_length}", timings, device=device.type,
                         batch_size=batch_size, question_length=question_length, num_answers=NUM_VQA_ANSWERS,
                         attention=model.backend_report()["attention"],
                         max_abs_logit_diff_to_first_backend=float((logits - first_answers).abs().max()))
        row["questions_per_s"] = batch_size / (row["median_ms"] / 1e3)
        rows.append(row)
        print(f"  {'vqa':<24} {backend:<8} {row['median_ms']:9.1f} ms/batch  {row['questions_per_s']:9.1f} questions/s")
    return rows


def _parse_size(text: str) -> Tuple[int, int]:
    height, width = (int(side) for side in text.lower().split("x"))
    if height < 1 or width < 1:
        raise ValueError(text)
    return height, width


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=20, help="caption tokens generated per image")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", default=None, help="HxW (default: 128x160 for tiny, 800x1216 otherwise)")
    parser.add_argument("--question-length", type=int, default=20, help="VQA question tokens with [CLS] and [SEP]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="fastvlp,torch", help="comma-separated attention backends")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    image_size = None
    if args.image_size is not None:
        try:
            image_size = _parse_size(args.image_size)
        except ValueError:
            parser.error(f"--image-size must look like 800x1216, got {args.image_size!r}")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if not backends or len(set(backends)) != len(backends):
        parser.error(f"--backends must name distinct backends, got {args.backends!r}")
    if min(args.batch_size, args.max_length, args.num_beams, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch-size, --max-length, --num-beams and --repeats must be >= 1, --warmup >= 0")
    if args.question_length < 2:
        parser.error("--question-length must be >= 2 ([CLS] and [SEP])")
    height, width = image_size or default_image_size(args.preset)
    device = device_name(args.device)
    print(f"generation and VQA inference, {args.preset}, batch {args.batch_size}, {height}x{width}, on {device}:")
    rows = run(args.preset, args.batch_size, args.max_length, args.num_beams, args.repeats, args.warmup, args.device,
               backends, (height, width), args.question_length)
    path = write_results(
        "generation", rows, device, args.out_dir,
        extra={"preset": args.preset, "image_size": f"{height}x{width}", "backends": backends,
               "repeats": args.repeats, "warmup": args.warmup},
        table_columns=("name", "contender", "shape", "median_ms", "p10_ms", "p90_ms", "tokens_per_s",
                       "questions_per_s", "attention"),
    )
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
