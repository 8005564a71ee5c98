"""Time per query (one image, one question) of E2E-VLP against a two-stage region-feature pipeline.

Contenders: ``e2e-fastvlp`` (E2E-VLP with the fastvlp attention), ``e2e-torch`` (the same weights with
``torch.nn.MultiheadAttention``), ``region-thresholded`` and ``region-36`` (bottom-up-attention features
with 10-100 or 36 boxes, then a UNITER-style BERT-base), each at every requested image size; the region
pipelines also once at their own 600x1000 ("native"). Every side answers with the same VQA head form
(Linear-GELU-LayerNorm-Linear to 3129 answers) on [CLS]; E2E-VLP's is a fresh head of its width. Stages
are timed between synchronisations (E2E-VLP: backbone, encoder, head; region: backbone, rpn, roi_heads,
bert); a batch's time is divided by its size. Inputs are random: the time does not depend on the pixels,
except for the thresholded selection's box count, which random weights keep at its minimum of 10.

The GPU is spun up once before the first row; each row warms up for at least ``--warmup`` runs and, on a
GPU, ``MIN_CUDA_WARMUP_S`` seconds of them (``warmup_runs``), and the contenders' order is reversed at every
other image size, so that no contender is always timed first. Every contender at one size gets the same
pixels: each row records the largest difference of its answer logits to its reference's
(``max_abs_logit_diff_to_reference``: e2e-fastvlp's for the E2E-VLP rows, the pipeline's own eager run's for
compiled region rows; the two region pipelines have different box sets, so nothing else compares).

Each row keeps its per-repeat totals (``raw_ms``, and from 6 repeats on their ``drift``, the median of the
first half over the second, and whether that is ``settled``) and per-stage timings (``stages_raw_ms``); the file
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
    DEFAULT_RESULTS_DIR, MIN_CUDA_WARMUP_S, compiled_frames, CompiledDuringTiming, device_error, device_name,
    error_reason, header_lines, min_warmup_seconds, result_payload, spin_up, strict_compilation, summarize,
    unsettled, warm_up,
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
            return self.head(state["encoded"].cls_hidden)

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
            return pipeline.bert(input_ids, text_mask, state["detections"], size)

        return (("backbone", backbone), ("rpn", rpn), ("roi_heads", roi_heads), ("bert", bert))


def run_stages(stages, device) -> Tuple[float, Dict[str, float], object]:
    """Run a query's stages, each up to a synchronisation: the total ms, the ms of each stage, and what the
    last stage returned (the answer logits)."""
    _synchronize(device)
    start = mark = time.perf_counter()
    spent, output = {}, None
    for name, stage in stages:
        output = stage()
        _synchronize(device)
        now = time.perf_counter()
        spent[name], mark = (now - mark) * 1e3, now
    return (mark - start) * 1e3, spent, output


def time_query(query, images, input_ids, text_mask, repeats: int, warmup: int, amp: bool, device,
               compiled: bool = False, min_warmup_s: float = 0.0) -> Tuple[Dict[str, object], object]:
    """Per-query timings (ms) after at least ``warmup`` runs and ``min_warmup_s`` seconds of them: the whole
    query's runs (``raw_ms``, with median, percentiles and, from 6 runs on, ``drift`` and ``settled``), each
    stage's runs (``stages_raw_ms``) and median (``stages``), and the warm-up's run count; and the answer
    logits of the last run. With ``compiled``, the runs happen under strict compilation and
    :class:`CompiledDuringTiming` is raised if Dynamo compiled anything after the warm-up (which must be at
    least 1 run)."""
    if compiled and warmup < 1:
        raise ValueError(f"warmup: compiled queries need at least 1 warm-up run to compile, got {warmup}")
    batch = images.shape[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    totals: List[float] = []
    parts: Dict[str, List[float]] = {}
    logits = None
    with torch.inference_mode(), autocast, (strict_compilation() if compiled else nullcontext()):
        warmup_runs = warm_up(lambda index: run_stages(query.stages(images, input_ids, text_mask), device),
                              warmup, min_warmup_s)
        frames_after_warmup = compiled_frames()
        for _ in range(repeats):
            total, spent, logits = run_stages(query.stages(images, input_ids, text_mask), device)
            totals.append(total / batch)
            for name, value in spent.items():
                parts.setdefault(name, []).append(value / batch)
    if compiled and compiled_frames() != frames_after_warmup:
        raise CompiledDuringTiming(
            f"torch.compile compiled {compiled_frames() - frames_after_warmup} frame(s) during the timed runs")
    summary = summarize(totals)
    if "drift" in summary:
        summary["settled"] = not unsettled(summary)
    return {**summary, "raw_ms": totals, "warmup_runs": warmup_runs,
            "stages": {name: summarize(values)["median_ms"] for name, values in parts.items()},
            "stages_raw_ms": parts}, logits


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


def job_order(count: int, image_sizes, native_size, region_indices) -> List[Tuple[int, Tuple[int, int], bool]]:
    """``(contender index, size, native)`` for every row: every contender at every size, the order reversed
    at every other size so that no contender is always the one timed first, then the region pipelines at
    their native size."""
    jobs = []
    for turn, size in enumerate(image_sizes):
        order = range(count) if turn % 2 == 0 else reversed(range(count))
        jobs += [(index, size, False) for index in order]
    return jobs + [(index, native_size, True) for index in region_indices]


def reference_pipeline(name: str) -> str:
    """The pipeline whose eager answers a row's are compared with: E2E-VLP with fastvlp attention for both
    E2E-VLP rows (the same weights), and a region pipeline's own eager run for its compiled rows."""
    return "e2e-fastvlp" if name.startswith("e2e") else name


def _answers_key(row: Dict[str, object]) -> Tuple[str, bool, str, bool]:
    return row["pipeline"], row["compiled"], row["image_size"], row["native"]


def fill_logit_differences(rows: List[Dict[str, object]], answers: Dict[tuple, torch.Tensor]) -> None:
    """Give every row ``logits_reference`` and ``max_abs_logit_diff_to_reference``: the largest difference
    between its answer logits and its reference's on the same inputs (None for the reference's own row, or
    while either has no answers)."""
    for row in rows:
        key = _answers_key(row)
        reference = (reference_pipeline(row["pipeline"]), False, row["image_size"], row["native"])
        mine, theirs = answers.get(key), answers.get(reference)
        row["logits_reference"] = f"{reference[0]} (eager)"
        row["max_abs_logit_diff_to_reference"] = (
            None if key == reference or mine is None or theirs is None else float((mine - theirs).abs().max()))


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
    # One batch of pixels per size, the same for every contender, so that their answers can be compared.
    pixels = {size: torch.randn(args.batch_size, 3, *size, generator=generator)
              for size in dict.fromkeys([*args.image_sizes, args.native_size])}
    regions = [index for index, (name, _, _) in enumerate(contenders) if name.startswith("region")]
    jobs = job_order(len(contenders), args.image_sizes, args.native_size, regions)
    extra = {"amp": args.amp, "repeats": args.repeats, "warmup": args.warmup,
             "min_warmup_s": min_warmup_seconds(device), "batch_size": args.batch_size,
             "text_length": args.text_length, "image_sizes": [f"{h}x{w}" for h, w in args.image_sizes],
             "native_size": "x".join(str(side) for side in args.native_size), "compile": args.compile}
    rows, answers = [], {}
    spin_up(device)  # before the first contender, which would otherwise be timed while the GPU's clocks rise
    for index, (height, width), native in tqdm(jobs, desc="e2e bench", unit="run"):
        name, preset, query = contenders[index]
        compiled = args.compile and index >= len(contenders) // 2
        images = pixels[(height, width)].to(device)
        row = {"pipeline": name, "preset": preset, "image_size": f"{height}x{width}", "native": native,
               "compiled": compiled, "batch_size": args.batch_size}
        if compiled:
            # One compiled row at a time: the region pipelines' res4/res5 share Sequential.forward's code
            # object, so without a reset the sizes add up to Dynamo's recompile limit.
            _dynamo.reset()
        try:
            measured, logits = time_query(query, images, input_ids, text_mask, args.repeats, args.warmup, args.amp,
                                          device, compiled=compiled, min_warmup_s=min_warmup_seconds(device))
            row.update(measured)
            answers[_answers_key(row)] = logits.float().cpu()
        except Exception as error:
            if not compiled:
                raise
            row.update({"median_ms": None, "p10_ms": None, "p90_ms": None, "raw_ms": [], "stages": {},
                        "stages_raw_ms": {}, "status": error_reason(error)})
        rows.append(row)
        fill_logit_differences(rows, answers)  # a row's reference may be timed after it
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


def _drift(row: Dict[str, object]) -> str:
    if row.get("drift") is None:
        return "-"
    return f"{row['drift']:.2f}" + (" unsettled" if unsettled(row) else "")


def _difference(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def markdown(payload: Dict[str, object]) -> str:
    stage_names = list(dict.fromkeys(name for row in payload["results"] for name in row["stages"]))
    with_status = any("status" in row for row in payload["results"])
    lines = [f"# End-to-end time per query on {payload['device']} ({_precision(payload)})", "",
             *header_lines(payload),
             f"Repeats {payload.get('repeats')} after {payload.get('warmup')} warm-up runs"
             + (f" (and at least {payload['min_warmup_s']:g} s of them)" if payload.get("min_warmup_s") else "")
             + f", batch {payload.get('batch_size')}, question length "
             f"{payload.get('text_length')}; raw timings in the JSON. Drift: the median of a row's first half of "
             "runs over its second (from 6 runs on). Logit diff: the largest difference of the answer logits "
             "to e2e-fastvlp's (E2E-VLP rows) or to the pipeline's own eager run (compiled region rows), on "
             "the same inputs.", "",
             "| pipeline | preset | image size | native | compiled | batch | median ms | p10 ms | p90 ms | drift | "
             + "".join(f"{name} ms | " for name in stage_names) + "logit diff |" + (" status |" if with_status else ""),
             "|" + "---|" * (11 + len(stage_names) + with_status)]
    for row in payload["results"]:
        cells = [row["pipeline"], row["preset"], row["image_size"], row["native"], row["compiled"], row["batch_size"],
                 _ms(row["median_ms"]), _ms(row["p10_ms"]), _ms(row["p90_ms"]), _drift(row)]
        cells += [_ms(row["stages"].get(name)) for name in stage_names]
        cells.append(_difference(row.get("max_abs_logit_diff_to_reference")))
        if with_status:
            cells.append(row.get("status", ""))
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def unsettled_summary(payload: Dict[str, object]) -> Optional[str]:
    """A line naming the rows whose timings had not settled, or None."""
    drifting = [f"{row['pipeline']}{' (compiled)' if row['compiled'] else ''} {row['image_size']}"
                f"{' native' if row['native'] else ''} (drift {row['drift']:.2f})"
                for row in payload["results"] if unsettled(row)]
    return f"unsettled, read their times with care: {', '.join(drifting)}" if drifting else None


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
    from fastvlp.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog="fastvlp bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-sizes", type=_parse_sizes, default=_parse_sizes("448x448,448x746,600x1000,800x1333"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row (from 6 on, rows get a drift figure)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs per row, at least 1 (on a GPU, for at least "
                             f"{MIN_CUDA_WARMUP_S:g} s as well)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--compile", action="store_true", help="also time both sides under torch.compile")
    parser.add_argument("--preset", default="e2e-vlp-12-r152", choices=list(PRESETS))
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
    if args.batch_size < 1 or args.repeats < 1 or not args.image_sizes:
        parser.error("--batch-size and --repeats must be >= 1, --image-sizes not empty")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: fastvlp's kernels compile and autotune on their first call (and "
                     "compiled rows compile), which the warm-up keeps out of the timing")
    if not 3 <= args.text_length <= 40:
        parser.error("--text-length must be in 3..40 (E2E-VLP's learned text positions)")
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    out = Path(args.out) if args.out else DEFAULT_RESULTS_DIR / device_name(args.device) / "e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(payload: Dict[str, object]) -> None:
        out.write_text(json.dumps(payload, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(payload))

    payload = run(args, after_row=write)
    write(payload)
    plotted = plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    drifting = unsettled_summary(payload)
    if drifting:
        print(drifting)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {plotted}" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
