"""Time per query (one image, one question) of E2E-VLP against a two-stage region-feature pipeline.

Contenders: ``e2e-fastvlp`` (E2E-VLP with the fastvlp attention), ``e2e-torch`` (the same weights with
``torch.nn.MultiheadAttention``), ``region-thresholded`` and ``region-36`` (bottom-up-attention features
with 10-100 or 36 boxes, then a UNITER-style BERT-base), each at every requested image size; the region
pipelines also once at their own 600x1000 ("native"). Every side answers with the same VQA head form
(Linear-GELU-LayerNorm-Linear to 3129 answers) on [CLS]; E2E-VLP's is a fresh head of its width. Stages
are timed between synchronisations (E2E-VLP: backbone, encoder, head; region: backbone, rpn, roi_heads,
bert); a batch's time is divided by its size. Inputs are random: the time does not depend on the pixels,
except for the thresholded selection's box count, which random weights keep at its minimum of 10.

Each row keeps its per-repeat totals (``raw_ms``) and per-stage timings (``stages_raw_ms``); the file
records the repeats, warm-up, batch size, question length and the run's provenance (commit, command, host,
versions, TF32 switches). With ``--compile``, Dynamo's caches are reset before every compiled row, its
calls run where reaching the recompile limit raises instead of silently running uncompiled, and a row
that compiled during its timed runs or fell back is reported with the reason and no timing.

The region pipelines are this project's re-implementation, with a Python loop over per-class NMS: on a
GPU those launch-bound calls weigh more than in the original detector, which matters when reading a GPU
ratio against them.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.bench.common import (
    DEFAULT_RESULTS_DIR, CompiledDuringTiming, compiled_frames, device_name, error_reason, header_lines, result_payload,
    strict_compilation, summarize,
)

E2E_STAGES = ("backbone", "encoder", "head")
REGION_STAGES = ("backbone", "rpn", "roi_heads", "bert")
NATIVE_SIZE = (600, 1000)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class E2EQuery:
    """E2E-VLP answering: backbone, encoder over ``[CLS] question [SEP] image``, VQA head on [CLS]."""

    def __init__(self, model, head):
        self.model, self.head = model, head

    def stages(self, images, input_ids, text_mask):
        pixel_mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        state = {}

        def backbone():
            state["visual"] = self.model.extract_visual_tokens(images, pixel_mask)

        def encoder():
            state["encoded"] = self.model.encode(None, None, input_ids, text_mask, visual_tokens=state["visual"])

        def head():
            state["logits"] = self.head(state["encoded"].cls_hidden)

        return (("backbone", backbone), ("encoder", encoder), ("head", head))


class RegionQuery:
    """The region pipeline's four stages."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def stages(self, images, input_ids, text_mask):
        size, state, pipeline = tuple(images.shape[-2:]), {}, self.pipeline

        def backbone():
            state["res4"] = pipeline.backbone(images)

        def rpn():
            state["proposals"] = pipeline.rpn(images, state["res4"])

        def roi_heads():
            state["detections"] = pipeline.roi_heads(state["res4"], state["proposals"], size)

        def bert():
            state["logits"] = pipeline.bert(input_ids, text_mask, state["detections"], size)

        return (("backbone", backbone), ("rpn", rpn), ("roi_heads", roi_heads), ("bert", bert))


def time_query(query, images, input_ids, text_mask, repeats: int, warmup: int, amp: bool, device,
               compiled: bool = False) -> Dict[str, object]:
    """Per-query timings (ms): the whole query's runs (``raw_ms``, with median and percentiles), each
    stage's runs (``stages_raw_ms``) and median (``stages``). With ``compiled``, the runs happen under
    strict compilation and :class:`CompiledDuringTiming` is raised if Dynamo compiled anything after the
    warm-up (which must be at least 1 run)."""
    if compiled and warmup < 1:
        raise ValueError(f"warmup: compiled queries need at least 1 warm-up run to compile, got {warmup}")
    batch = images.shape[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    totals: List[float] = []
    parts: Dict[str, List[float]] = {}
    frames_after_warmup = None
    with torch.inference_mode(), autocast, (strict_compilation() if compiled else nullcontext()):
        for run in range(warmup + repeats):
            if run == warmup:
                frames_after_warmup = compiled_frames()
            stages = query.stages(images, input_ids, text_mask)
            _synchronize(device)
            start = mark = time.perf_counter()
            spent = {}
            for name, stage in stages:
                stage()
                _synchronize(device)
                now = time.perf_counter()
                spent[name], mark = (now - mark) * 1e3 / batch, now
            if run >= warmup:
                totals.append((mark - start) * 1e3 / batch)
                for name, value in spent.items():
                    parts.setdefault(name, []).append(value)
    if compiled and compiled_frames() != frames_after_warmup:
        raise CompiledDuringTiming(
            f"torch.compile compiled {compiled_frames() - frames_after_warmup} frame(s) during the timed runs")
    return {**summarize(totals), "raw_ms": totals,
            "stages": {name: summarize(values)["median_ms"] for name, values in parts.items()},
            "stages_raw_ms": parts}


def _parse_size(text: str) -> Tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image size like 600x1000, got {text!r}") from None
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"expected sides of at least 32 pixels, got {text!r}")
    return height, width


def _parse_sizes(text: str) -> List[Tuple[int, int]]:
    return [_parse_size(part) for part in text.split(",") if part.strip()]


def build_contenders(args, device) -> List[Tuple[str, str, object]]:
    """``(pipeline name, preset or model, query)`` for the four contenders, eval mode, on ``device``."""
    from fastvlp.baselines.region import RegionPipeline
    from fastvlp.baselines.region_transformer import bert_base_config
    from fastvlp.baselines.vqa_head import VQAHead
    from fastvlp.models import E2EVLP

    torch.manual_seed(args.seed)
    fast = E2EVLP.from_preset(args.preset, attention_backend="fastvlp", matcher_backend="fastvlp").eval()
    reference = E2EVLP.from_preset(args.preset, attention_backend="torch", matcher_backend="fastvlp").eval()
    reference.load_state_dict(copy.deepcopy(fast.state_dict()))
    head = VQAHead(fast.config.d_model, layer_norm_eps=fast.config.layer_norm_eps).eval().to(device)
    bert_overrides = {}
    if args.bert_layers is not None:
        bert_overrides["num_hidden_layers"] = args.bert_layers
    if args.bert_hidden is not None:
        bert_overrides.update(hidden_size=args.bert_hidden, num_attention_heads=max(1, args.bert_hidden // 64),
                              intermediate_size=4 * args.bert_hidden)
    detector = {}
    if args.rpn_pre_nms is not None:
        detector["rpn_pre_nms_top_n"] = args.rpn_pre_nms
    if args.rpn_post_nms is not None:
        detector["rpn_post_nms_top_n"] = args.rpn_post_nms
    thresholded = RegionPipeline("thresholded", bert_config=bert_base_config(**bert_overrides), seed=args.seed, **detector)
    fixed = RegionPipeline("fixed", bert_config=bert_base_config(**bert_overrides), seed=args.seed, **detector)
    contenders = [
        ("e2e-fastvlp", args.preset, E2EQuery(fast.to(device), head)),
        ("e2e-torch", args.preset, E2EQuery(reference.to(device), head)),
        ("region-thresholded", "r101-c4+bert-base", RegionQuery(thresholded.eval().to(device))),
        ("region-36", "r101-c4+bert-base", RegionQuery(fixed.eval().to(device))),
    ]
    return contenders


def _copy_with_own_children(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy (same parameters and buffers) whose child assignments stay on the copy:
    ``copy.copy`` alone shares the ``_modules`` dict, so replacing a child would replace it in the original."""
    clone = copy.copy(module)
    clone.__dict__["_modules"] = copy.copy(module._modules)
    return clone


def _compiled(query):
    """The same query with its models' heavy modules under ``torch.compile`` (shared weights); ``query``
    and its modules are left as they were."""
    if isinstance(query, E2EQuery):
        model = _copy_with_own_children(query.model)
        model.backbone, model.encoder = torch.compile(query.model.backbone), torch.compile(query.model.encoder)
        return E2EQuery(model, torch.compile(query.head))
    pipeline = _copy_with_own_children(query.pipeline)
    detector = _copy_with_own_children(pipeline.detector)
    detector.res4, detector.res5 = torch.compile(detector.res4), torch.compile(detector.res5)
    pipeline.detector = detector
    pipeline.transformer = torch.compile(pipeline.transformer)
    return RegionQuery(pipeline)


def run(args, after_row: Optional[Callable[[Dict[str, object]], None]] = None) -> Dict[str, object]:
    """Time every contender at every size; ``after_row`` gets the payload so far (``complete`` False)
    after each row, so that a run cut short keeps what it measured."""
    from tqdm import tqdm

    from torch import _dynamo

    device = torch.device(args.device)
    contenders = build_contenders(args, device)
    if args.compile:
        contenders += [(name, preset, _compiled(query)) for name, preset, query in contenders]
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(1000, 30000, (args.batch_size, args.text_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    input_ids = input_ids.to(device)
    text_mask = torch.ones_like(input_ids, dtype=torch.bool)
    jobs = [(index, size, False) for size in args.image_sizes for index in range(len(contenders))]
    jobs += [(index, args.native_size, True) for index, (name, _, _) in enumerate(contenders) if name.startswith("region")]
    extra = {"amp": args.amp, "repeats": args.repeats, "warmup": args.warmup, "batch_size": args.batch_size,
             "text_length": args.text_length, "image_sizes": [f"{h}x{w}" for h, w in args.image_sizes],
             "native_size": "x".join(str(side) for side in args.native_size), "compile": args.compile}
    rows = []
    for index, (height, width), native in tqdm(jobs, desc="e2e bench", unit="run"):
        name, preset, query = contenders[index]
        compiled = args.compile and index >= len(contenders) // 2
        images = torch.randn(args.batch_size, 3, height, width, generator=generator).to(device)
        row = {"pipeline": name, "preset": preset, "image_size": f"{height}x{width}", "native": native,
               "compiled": compiled, "batch_size": args.batch_size}
        if compiled:
            # One compiled row at a time: the region pipelines' res4/res5 share Sequential.forward's code
            # object, so without a reset the sizes add up to Dynamo's recompile limit.
            _dynamo.reset()
        try:
            row.update(time_query(query, images, input_ids, text_mask, args.repeats, args.warmup, args.amp, device,
                                  compiled=compiled))
        except Exception as error:
            if not compiled:
                raise
            row.update({"median_ms": None, "p10_ms": None, "p90_ms": None, "raw_ms": [], "stages": {},
                        "stages_raw_ms": {}, "status": error_reason(error)})
        rows.append(row)
        if after_row is not None:
            after_row(result_payload("e2e", rows, device_name(args.device), extra=extra, complete=False))
    return result_payload("e2e", rows, device_name(args.device), extra=extra)


def _precision(payload: Dict[str, object]) -> str:
    if payload["amp"]:
        return "bf16 autocast"
    origin = payload.get("provenance") or {}
    # On a GPU, fp32 convolutions and matmuls may run in TF32: say which.
    return f"fp32; TF32 matmul {origin.get('tf32_matmul')}, TF32 cuDNN {origin.get('tf32_cudnn')}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(payload: Dict[str, object]) -> str:
    stage_names = list(dict.fromkeys(name for row in payload["results"] for name in row["stages"]))
    with_status = any("status" in row for row in payload["results"])
    lines = [f"# End-to-end time per query on {payload['device']} ({_precision(payload)})", "",
             *header_lines(payload),
             f"Repeats {payload.get('repeats')} after {payload.get('warmup')} warm-up runs, batch "
             f"{payload.get('batch_size')}, question length {payload.get('text_length')}; raw timings in the JSON.", "",
             "| pipeline | preset | image size | native | compiled | batch | median ms | p10 ms | p90 ms | "
             + " | ".join(f"{name} ms" for name in stage_names) + (" | status |" if with_status else " |"),
             "|" + "---|" * (9 + len(stage_names) + with_status)]
    for row in payload["results"]:
        cells = [row["pipeline"], row["preset"], row["image_size"], row["native"], row["compiled"], row["batch_size"],
                 _ms(row["median_ms"]), _ms(row["p10_ms"]), _ms(row["p90_ms"])]
        cells += [_ms(row["stages"].get(name)) for name in stage_names]
        if with_status:
            cells.append(row.get("status", ""))
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: Dict[str, object], path: Path) -> Optional[Path]:
    """Per-stage stacked bars for each pipeline and size; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = payload["results"]
    labels = [f"{r['pipeline']}{' (compiled)' if r['compiled'] else ''}\n{r['image_size']}{' native' if r['native'] else ''}"
              for r in rows]
    stage_names = list(dict.fromkeys(name for row in rows for name in row["stages"]))
    figure, axes = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    bottoms = [0.0] * len(rows)
    for name in stage_names:
        heights = [row["stages"].get(name, 0.0) for row in rows]
        axes.bar(range(len(rows)), heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("ms per query (stage medians)")
    axes.set_title(f"Time per query on {payload['device']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvlp bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-sizes", type=_parse_sizes, default=_parse_sizes("448x448,448x746,600x1000,800x1333"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--compile", action="store_true", help="also time both sides under torch.compile")
    parser.add_argument("--preset", default="e2e-vlp-12-r152")
    parser.add_argument("--out", default=None, help="JSON file (the .md and .png go beside it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-length", type=int, default=20, help="question tokens, [CLS] and [SEP] included")
    # Reduced sizes for tests: hidden.
    parser.add_argument("--native-size", type=_parse_size, default=NATIVE_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--bert-layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bert-hidden", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rpn-pre-nms", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rpn-post-nms", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or not args.image_sizes:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0, --image-sizes not empty")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1: the compiled rows compile in their warm-up")
    if not 3 <= args.text_length <= 40:
        parser.error("--text-length must be in 3..40 (E2E-VLP's learned text positions)")
    out = Path(args.out) if args.out else DEFAULT_RESULTS_DIR / device_name(args.device) / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(payload: Dict[str, object]) -> None:
        out.write_text(json.dumps(payload, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(payload))

    payload = run(args, after_row=write)
    write(payload)
    plotted = plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {plotted}" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
