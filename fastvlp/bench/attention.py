"""Fused attention against its peers, on E2E-VLP's own attention shapes (GPU).

Scenarios (H=8, D=32 unless noted; ``[B, L, H, D]`` tensors):
  E         encoder self-attention, B=32, L=1090 (40 text + 30x35 image tokens), ~20% key
            padding interleaved along image rows (DETR's 2-D padding, flattened)
  X         decoder cross-attention, 100 queries to E's 1090 keys and padding
  S         decoder self-attention, 100x100, no mask
  C-self    caption self-attention, causal 40x40 with text padding
  C-cross   40 caption queries to E's 1090 keys and padding
  D         a cached caption decoding step's cross-attention: one query each for B=64 (16 images
            times 4 beams) to an image-only memory of 30x35 tokens with E's image padding
  standard  B=4, H=16, L=4096, D=64, no mask
each at dropout 0 and 0.1, forward alone and forward+backward.

Contenders: fastvlp's Triton kernels; SDPA under each of its backends (flash,
efficient, cudnn, math), rows for the ones that reject the call, and SDPA's default
dispatch handed the bool mask; FlexAttention compiled (dropout 0 only); xformers'
memory_efficient_attention when installed. Masks follow one rule (see
``fastvlp.bench.attention_masks``): each peer gets its mask in its own best form, built
outside the timing, and each build is timed as its own ``mask build`` row; the
``sdpa-default-boolmask`` row shows what converting a bool mask inside every call costs.
SDPA's backend choice (``sdpa_kernel``) is entered once around a row's calls, not timed.

FlexAttention is compiled with ``fullgraph=True``; Dynamo's caches are reset at the start
of every scenario, and a row whose compilation would fall back to running uncompiled
(Dynamo's recompile limit) or that compiles during its timed calls is reported as not
timed, with the reason.

Module rows, which include the input and output projections and share one set of
weights: ``fastvlp.nn.MultiheadAttention`` called for its fused path
(``need_weights=False``, ``is_causal`` with the causal mask) against
``torch.nn.MultiheadAttention`` called the same way, its fair peer (it then runs SDPA);
and, for reference only and never in a ratio, ``nn.MultiheadAttention`` as DETR calls it
(``need_weights`` left True, so it materialises the head-averaged weights).

Correctness is checked at dropout 0, where the peers compute the same function: every
kernel row's output (forward) and input gradients (forward+backward) against a float32
reference, every module row's output against float32 ``nn.MultiheadAttention`` with the
same weights. A row over the dtype's tolerance keeps its timings but gets a
``wrong result`` status, and a row whose gradient check raised a ``not checked`` status;
either keeps it out of every ratio. Dropout rows are not checked: each implementation
draws its own dropout mask.

Timing: on a GPU, after a once-per-process spin-up, each row warms up for at least
``--warmup`` calls and ``common.MIN_CUDA_WARMUP_S`` seconds. Each (scenario, dropout)
pass times the contenders in a rotated order (one further along each pass, recorded as
``timing_position``), so that no contender is always timed first; rows keep one order.
A row whose timings drifted (``drift``, ``settled`` in the results) is named beside any
ratio it enters in the speed-up summary.

TFLOP/s count only unmasked work: 4*D per visible (query, key) pair per head
forward, 3.5 times that for forward+backward; module rows add their four projections,
2*B*E*E*(2*Lq + 2*Lk) forward and 3 times that for forward+backward (E = H*D; the
weights the DETR-style row materialises are not counted). Peak memory is the allocator's
peak above the inputs during one call (CUDA only). ``run`` also takes ``device="cpu"``
(host timings, the reference backend for fastvlp) so that its bookkeeping can be tested
without a GPU; the numbers that matter come from a GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch

from fastvlp.bench.attention_masks import (
    flex_block_mask, sdpa_bool_mask, sdpa_mask, xformers_bias,
)
from fastvlp.bench.common import (
    DRIFT_LIMIT, device_name, error_reason, result_row, strict_compilation, time_compiled_calls, time_cuda_calls,
    time_host_calls, unavailable_row, unsettled, write_results,
)

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def image_text_padding(batch: int, text_tokens: int = 40, height: int = 30, width: int = 35,
                       seed: int = 0) -> torch.Tensor:
    """Bool ``[B, text + H*W]`` key padding (True = ignore): a text part with 8..text
    valid tokens, then an image whose valid region is a random 80-100% of each side,
    flattened row by row, so about 20% of the image tokens are padding."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        text = torch.arange(text_tokens) >= int(torch.randint(8, text_tokens + 1, (1,), generator=generator))
        valid_h = max(1, round(height * (0.8 + 0.2 * float(torch.rand(1, generator=generator)))))
        valid_w = max(1, round(width * (0.8 + 0.2 * float(torch.rand(1, generator=generator)))))
        image = torch.ones(height, width, dtype=torch.bool)
        image[:valid_h, :valid_w] = False
        rows.append(torch.cat([text, image.flatten()]))
    return torch.stack(rows)


def text_padding(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, length + 1, (batch,), generator=generator)
    return torch.arange(length)[None, :] >= lengths[:, None]


def visible_pairs(batch: int, query_length: int, key_length: int, key_padding_mask: Optional[torch.Tensor],
                  causal: bool) -> int:
    """Number of (batch, query, key) triples that attention actually computes."""
    visible = torch.ones(batch, query_length, key_length, dtype=torch.bool)
    if key_padding_mask is not None:
        visible &= ~key_padding_mask.cpu()[:, None, :]
    if causal:
        rows = torch.arange(query_length)[:, None]
        visible &= torch.arange(key_length)[None, :] <= rows + key_length - query_length
    return int(visible.sum())


def scenarios() -> List[Dict[str, object]]:
    encoder_mask = image_text_padding(32)
    return [
        dict(name="E", batch=32, heads=8, head_dim=32, query_length=1090, key_length=1090, mask=encoder_mask,
             causal=False),
        dict(name="X", batch=32, heads=8, head_dim=32, query_length=100, key_length=1090, mask=encoder_mask,
             causal=False),
        dict(name="S", batch=32, heads=8, head_dim=32, query_length=100, key_length=100, mask=None, causal=False),
        dict(name="C-self", batch=32, heads=8, head_dim=32, query_length=40, key_length=40,
             mask=text_padding(32, 40), causal=True),
        dict(name="C-cross", batch=32, heads=8, head_dim=32, query_length=40, key_length=1090, mask=encoder_mask,
             causal=False),
        dict(name="D", batch=64, heads=8, head_dim=32, query_length=1, key_length=1050,
             mask=image_text_padding(64)[:, 40:], causal=False),
        dict(name="standard", batch=4, heads=16, head_dim=64, query_length=4096, key_length=4096, mask=None,
             causal=False),
    ]


SCENARIO_NAMES = ("E", "X", "S", "C-self", "C-cross", "D", "standard")


def reject_unknown(parser, option: str, given: Optional[Sequence[str]], known: Sequence[str]) -> None:
    """``parser.error`` naming ``option``, the unknown names in ``given`` and the valid ones."""
    unknown = sorted(set(given or ()) - set(known))
    if unknown:
        parser.error(f"{option}: unknown {unknown}; expected names from {' '.join(known)}")


# ---------------------------------------------------------------- contenders

@dataclass(frozen=True)
class Setup:
    """Where and how a run's contenders run: the device, the inputs' dtype and torch.compile's backend."""

    device: str = "cuda"
    dtype: torch.dtype = torch.float16
    compile_backend: str = "inductor"


@dataclass
class Prepared:
    """A contender ready to time. ``call(q, k, v)`` runs it on ``[B, L, H, D]`` tensors; ``hold()`` is a
    context entered once around its trial, warm-up and timed calls (so its own cost stays out of every
    call); ``compiled`` marks calls that run torch.compile'd code; ``zero_grad`` clears its parameters'
    gradients after each forward+backward; ``fields`` are added to its rows."""

    call: Callable
    hold: Callable[[], ContextManager] = contextlib.nullcontext
    compiled: bool = False
    zero_grad: Optional[Callable[[], None]] = None
    fields: Dict[str, object] = field(default_factory=dict)


# Each builder takes (scenario, dropout_p, setup) and returns a Prepared, or raises with the reason it
# cannot take the call. Masks are built here, outside the timing.

def _fastvlp(scenario, dropout_p, setup: Setup) -> Prepared:
    from fastvlp.ops.fmha.dispatch import attention

    mask, causal = scenario["mask"], scenario["causal"]
    # The kernels on CUDA; on a CPU (bookkeeping tests) the reference, since the kernels need a GPU.
    backend = "triton" if torch.device(setup.device).type == "cuda" else "reference"
    return Prepared(lambda q, k, v: attention(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=dropout_p,
                                              backend=backend),
                    fields={"backend": backend, "mask_form": "bool key padding [B, Lk], as the model holds it"})


def _sdpa_call(attn_mask, is_causal, dropout_p):
    import torch.nn.functional as F

    def call(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        return out.transpose(1, 2)

    return call


def _sdpa(backend_name):
    def build(scenario, dropout_p, setup: Setup) -> Prepared:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        attn_mask, is_causal = sdpa_mask(scenario, setup.device, setup.dtype)
        return Prepared(_sdpa_call(attn_mask, is_causal, dropout_p), hold=lambda: sdpa_kernel([backend]),
                        fields={"mask_form": "additive in the inputs' dtype, 16-aligned, prebuilt"})

    return build


def _sdpa_default_boolmask(scenario, dropout_p, setup: Setup) -> Prepared:
    attn_mask, is_causal = sdpa_bool_mask(scenario, setup.device)
    return Prepared(_sdpa_call(attn_mask, is_causal, dropout_p),
                    fields={"mask_form": "bool, converted by SDPA inside every call"})


def _flex(scenario, dropout_p, setup: Setup) -> Prepared:
    if dropout_p > 0:
        raise RuntimeError("FlexAttention has no dropout")
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = flex_block_mask(scenario, setup.device)
    # fullgraph: a graph break would run part of it eagerly, which is not what the row names.
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True, backend=setup.compile_backend)

    def call(q, k, v):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return Prepared(call, compiled=True, fields={"mask_form": "BlockMask, prebuilt"})


def _xformers(scenario, dropout_p, setup: Setup) -> Prepared:
    import xformers.ops as xops

    bias = xformers_bias(scenario, scenario["heads"], setup.device, setup.dtype)
    return Prepared(lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p),
                    fields={"mask_form": "dense additive bias, prebuilt" if isinstance(bias, torch.Tensor)
                            else "attn_bias object"})


MODULE_KINDS = ("detr", "torch", "fastvlp")


def _module_arguments(kind: str, scenario, device) -> Dict[str, object]:
    """Keyword arguments of a module row's call. ``"detr"``: as DETR calls ``nn.MultiheadAttention``
    (``need_weights`` left True, causality as a bool ``attn_mask``). ``"torch"`` and ``"fastvlp"``: the
    call the model's layers make, ``need_weights=False`` with the causal mask and its ``is_causal`` hint;
    it takes fastvlp's fused path and torch's SDPA path."""
    if kind not in MODULE_KINDS:
        raise ValueError(f"kind: expected one of {MODULE_KINDS}, got {kind!r}")
    mask, causal = scenario["mask"], scenario["causal"]
    attn_mask = None
    if causal:
        query_length, key_length = scenario["query_length"], scenario["key_length"]
        rows = torch.arange(query_length, device=device)[:, None]
        attn_mask = torch.arange(key_length, device=device)[None, :] > rows + key_length - query_length
    arguments = dict(key_padding_mask=None if mask is None else mask.to(device), attn_mask=attn_mask)
    if kind != "detr":
        arguments.update(need_weights=False, is_causal=causal)
    return arguments


def _module_weights(scenario) -> Dict[str, torch.Tensor]:
    """One set of MultiheadAttention weights per scenario, shared by every module row."""
    if "module_weights" not in scenario:
        width = scenario["heads"] * scenario["head_dim"]
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        scenario["module_weights"] = torch.nn.MultiheadAttention(width, scenario["heads"]).state_dict()
        torch.random.set_rng_state(generator_state)
    return scenario["module_weights"]


def _module_call(kind: str, scenario, dropout_p: float, device, dtype: torch.dtype):
    """``(module, call)``: a ``kind`` MultiheadAttention (torch's for ``"detr"`` and ``"torch"``) of the
    scenario's width with the scenario's shared weights, on ``device`` in training mode, and a function
    (q, k, v) -> output on ``[B, L, H, D]`` tensors that runs it as the row does."""
    if kind not in MODULE_KINDS:
        raise ValueError(f"kind: expected one of {MODULE_KINDS}, got {kind!r}")
    heads, head_dim = scenario["heads"], scenario["head_dim"]
    width = heads * head_dim
    if kind == "fastvlp":
        from fastvlp.nn.multihead_attention import MultiheadAttention

        module = MultiheadAttention(width, heads, dropout=dropout_p)
    else:
        module = torch.nn.MultiheadAttention(width, heads, dropout=dropout_p)
    module.load_state_dict(_module_weights(scenario))
    module = module.to(device, dtype).train()
    arguments = _module_arguments(kind, scenario, device)

    def call(q, k, v):
        batch, query_length = q.shape[:2]
        key_length = k.shape[1]
        # DETR feeds [L, B, E] activations; the projections run inside the module.
        query = q.reshape(batch, query_length, width).transpose(0, 1)
        key = k.reshape(batch, key_length, width).transpose(0, 1)
        value = v.reshape(batch, key_length, width).transpose(0, 1)
        out = module(query, key, value, **arguments)[0]
        return out.transpose(0, 1).reshape(batch, query_length, heads, -1)

    return module, call


def _module(kind):
    def build(scenario, dropout_p, setup: Setup) -> Prepared:
        module, call = _module_call(kind, scenario, dropout_p, setup.device, setup.dtype)
        return Prepared(call, zero_grad=lambda: module.zero_grad(set_to_none=True),
                        fields={"need_weights": kind == "detr"})

    return build


KERNEL_REFERENCE = "float32 attention_reference"
MODULE_ROWS = {
    "torch-mha (module)": "torch",
    "fastvlp-mha (module)": "fastvlp",
    "torch-mha-detr (module, reference only)": "detr",
}

CONTENDERS: Dict[str, Callable] = {
    "fastvlp": _fastvlp,
    **{f"sdpa-{name.split('_')[0].lower()}": _sdpa(name) for name in SDPA_BACKENDS},
    "sdpa-default-boolmask": _sdpa_default_boolmask,
    "flex-compiled": _flex,
    "xformers": _xformers,
    **{name: _module(kind) for name, kind in MODULE_ROWS.items()},
}

# Mask preparations, timed as their own rows: (row contender, the contenders that use it, builder).
# fastvlp has none: it reads the bool key padding the model holds.
MASK_BUILDS = (
    ("sdpa-mask-build", tuple(f"sdpa-{name.split('_')[0].lower()}" for name in SDPA_BACKENDS),
     lambda scenario, setup: sdpa_mask(scenario, setup.device, setup.dtype)[0]),
    ("flex-blockmask-build", ("flex-compiled",), lambda scenario, setup: flex_block_mask(scenario, setup.device)),
    ("xformers-bias-build", ("xformers",),
     lambda scenario, setup: xformers_bias(scenario, scenario["heads"], setup.device, setup.dtype)),
)


def _mask_build_rows(scenario, setup: Setup, contenders, timer, repeats: int, shape: str,
                     common: Dict[str, object]) -> List[Dict[str, object]]:
    """A timed row per mask preparation that a selected peer uses; none where there is nothing to build,
    and none for xformers when it is not installed (its row says so)."""
    rows = []
    for row_name, users, build in MASK_BUILDS:
        if contenders and not set(users) & set(contenders):
            continue
        if row_name.startswith("xformers") and importlib.util.find_spec("xformers") is None:
            continue
        try:
            if build(scenario, setup) is None:
                continue
            timings = timer(lambda _: build(scenario, setup), repeats=max(3, repeats // 4), warmup=1)
            rows.append(result_row(scenario["name"], row_name, shape, timings, mode="mask build", **common,
                                   dropout_p=0.0))
        except Exception as error:
            rows.append(unavailable_row(scenario["name"], row_name, shape, _error(error), mode="mask build",
                                        **common, dropout_p=0.0))
    return rows


# Largest max-abs difference to the float32 reference, relative to the reference's largest magnitude
# (at least 1), that still counts as the same result.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-3}


def is_module_row(contender: str) -> bool:
    return contender in MODULE_ROWS


# ---------------------------------------------------------------- measurement

def _peak_memory_mb(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _error(error: BaseException) -> str:
    return error_reason(error)


def _kernel_reference(scenario, q, k, v, grad_out):
    """Float32 output and input gradients of the scenario's attention (dropout 0)."""
    from fastvlp.ops.fmha.reference import attention_reference

    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out = attention_reference(*inputs, key_padding_mask=scenario["mask"], causal=scenario["causal"])
        grads = torch.autograd.grad(out, inputs, grad_out.float())
    return out.detach(), [g.detach() for g in grads]


def _module_reference(scenario, q, k, v, device):
    module, call = _module_call("torch", scenario, 0.0, device, torch.float32)
    with torch.no_grad():
        return call(q.float(), k.float(), v.float())


def _difference(found: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> tuple:
    """(max abs difference, scale of the expected values) over matching tensors."""
    difference = max(float((a.float() - b).abs().max()) for a, b in zip(found, expected))
    scale = max(1.0, max(float(b.abs().max()) for b in expected))
    return difference, scale


def _input_gradients(prepared: Prepared, q, k, v, grad_out):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        prepared.call(*inputs).backward(grad_out)
    if prepared.zero_grad is not None:
        prepared.zero_grad()
    return [t.grad for t in inputs]


def _check(label: Dict[str, object], key: str, found, expected, dtype) -> Optional[str]:
    """Record the difference in ``label``; the wrong-result status if it exceeds the tolerance."""
    difference, scale = _difference(found, expected)
    label[key] = difference
    tolerance = TOLERANCE.get(dtype, 1e-3) * scale
    if not difference <= tolerance:  # also catches NaN
        return f"wrong result: {key} {difference:.3g} > {tolerance:.3g}"
    return None


def _verify(contender: str, prepared: Prepared, out: torch.Tensor, label: Dict[str, object],
            references: Dict[str, object], scenario, tensors, device, dtype):
    """Check one contender at dropout 0: ``(per-mode row fields, per-mode status or None)``. Kernels: the
    output (fwd) and the input gradients (fwd+bwd) against a float32 reference; modules: the output
    against float32 ``nn.MultiheadAttention`` with the same weights. A gradient check that raises gives
    fwd+bwd a ``not checked: <reason>`` status (if its timing fails too, the row reports that instead)."""
    q, k, v, grad_out = tensors
    labels = {"fwd": dict(label), "fwd+bwd": dict(label)}
    statuses: Dict[str, Optional[str]] = {"fwd": None, "fwd+bwd": None}
    if is_module_row(contender):
        if "module" not in references:
            references["module"] = _module_reference(scenario, q, k, v, device)
        labels["fwd"]["checked_against"] = "float32 torch.nn.MultiheadAttention"
        statuses["fwd"] = _check(labels["fwd"], "max_abs_diff_vs_reference", [out], [references["module"]], dtype)
        return labels, statuses
    if "kernel" not in references:
        references["kernel"] = _kernel_reference(scenario, q, k, v, grad_out)
    expected_out, expected_grads = references["kernel"]
    labels["fwd"]["checked_against"] = KERNEL_REFERENCE
    statuses["fwd"] = _check(labels["fwd"], "max_abs_diff_vs_reference", [out], [expected_out], dtype)
    try:
        with prepared.hold(), _strict_if(prepared.compiled):
            grads = _input_gradients(prepared, q, k, v, grad_out)
    except Exception as error:  # its timing would still run: never let it pass as checked
        statuses["fwd+bwd"] = f"not checked: {_error(error)}"
        return labels, statuses
    labels["fwd+bwd"]["checked_against"] = KERNEL_REFERENCE
    statuses["fwd+bwd"] = _check(labels["fwd+bwd"], "max_abs_grad_diff_vs_reference", grads, expected_grads, dtype)
    return labels, statuses


def rotated(items: Sequence, start: int) -> list:
    """``items`` from index ``start`` (modulo their count) round to the one before it: one pass's timing
    order, so that no contender is always timed first."""
    items = list(items)
    if not items:
        return []
    start %= len(items)
    return items[start:] + items[:start]


def projection_flops(scenario) -> float:
    """Forward FLOPs of a MultiheadAttention's four projections (query and output over Lq tokens, key and
    value over Lk), which a module row times on top of the attention core."""
    width = scenario["heads"] * scenario["head_dim"]
    return 2.0 * scenario["batch"] * width * width * (2 * scenario["query_length"] + 2 * scenario["key_length"])


@dataclass
class _Inputs:
    """One scenario's inputs and what every row of it shares; ``references`` are computed on first use,
    ``wrong_without_dropout`` collects the contenders whose dropout rows cannot be trusted either."""

    scenario: Dict[str, object]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    shape: str
    common: Dict[str, object]
    forward_flops: float
    references: Dict[str, object] = field(default_factory=dict)
    wrong_without_dropout: set = field(default_factory=set)


def _scenario_inputs(scenario, device, dtype: torch.dtype) -> _Inputs:
    batch, heads, head_dim = scenario["batch"], scenario["heads"], scenario["head_dim"]
    query_length, key_length = scenario["query_length"], scenario["key_length"]
    if scenario["mask"] is not None:
        scenario["mask"] = scenario["mask"].to(device)
    pairs = visible_pairs(batch, query_length, key_length, scenario["mask"], scenario["causal"])
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, query_length, heads, head_dim, device=device, dtype=dtype, generator=generator)
    k = torch.randn(batch, key_length, heads, head_dim, device=device, dtype=dtype, generator=generator)
    v = torch.randn(batch, key_length, heads, head_dim, device=device, dtype=dtype, generator=generator)
    grad_out = torch.randn(q.shape, device=device, dtype=dtype, generator=generator)
    padded = 0.0 if scenario["mask"] is None else float(scenario["mask"].float().mean())
    common = dict(visible_pairs=pairs, key_padding_fraction=round(padded, 4), causal=scenario["causal"],
                  dtype=str(dtype).replace("torch.", ""))
    return _Inputs(scenario, q, k, v, grad_out, f"B{batch} H{heads} D{head_dim} {query_length}x{key_length}",
                   common, 4.0 * head_dim * heads * pairs)


def _mode_flops(contender: str, inputs: _Inputs) -> Dict[str, float]:
    """FLOPs per mode: the attention core (3.5x forward for forward+backward), plus the projections on
    module rows (3x forward for forward+backward: input and weight gradients)."""
    flops = {"fwd": inputs.forward_flops, "fwd+bwd": 3.5 * inputs.forward_flops}
    if is_module_row(contender):
        projections = projection_flops(inputs.scenario)
        flops = {"fwd": flops["fwd"] + projections, "fwd+bwd": flops["fwd+bwd"] + 3 * projections}
    return flops


def _timed_calls(prepared: Prepared, inputs: _Inputs) -> Dict[str, Callable[[int], None]]:
    q, k, v, grad_out = inputs.q, inputs.k, inputs.v, inputs.grad_out
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward(_):
        with torch.no_grad():
            prepared.call(q, k, v)

    def forward_backward(_):
        prepared.call(*leaves).backward(grad_out)
        for t in leaves:
            t.grad = None
        if prepared.zero_grad is not None:
            prepared.zero_grad()

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _statuses(contender: str, dropout_p: float, prepared: Prepared, out: torch.Tensor, label, inputs: _Inputs,
              setup: Setup):
    """``(per-mode row fields, per-mode status or None)``: checked at dropout 0, where every peer computes
    the same function; at other dropouts untrusted if the contender was wrong at dropout 0."""
    if dropout_p == 0.0:
        mode_labels, statuses = _verify(contender, prepared, out, label, inputs.references, inputs.scenario,
                                        (inputs.q, inputs.k, inputs.v, inputs.grad_out), setup.device, setup.dtype)
        if any(status and status.startswith("wrong result") for status in statuses.values()):
            inputs.wrong_without_dropout.add(contender)
        return mode_labels, statuses
    untrusted = "wrong result at dropout 0 (dropout rows are not checked)"
    status = untrusted if contender in inputs.wrong_without_dropout else None
    return {"fwd": dict(label), "fwd+bwd": dict(label)}, {"fwd": status, "fwd+bwd": status}


def _contender_rows(contender: str, dropout_p: float, position: int, inputs: _Inputs, setup: Setup, timer,
                    repeats: int, warmup: int, progress: bool) -> List[Dict[str, object]]:
    """One contender's fwd and fwd+bwd rows at ``dropout_p``; ``position`` is its place in the pass's
    timing order, recorded in its rows."""
    name, shape, cuda = inputs.scenario["name"], inputs.shape, torch.device(setup.device).type == "cuda"
    label = dict(inputs.common, dropout_p=dropout_p, timing_position=position)
    try:
        prepared = CONTENDERS[contender](inputs.scenario, dropout_p, setup)
        label.update(prepared.fields)
        with prepared.hold(), _strict_if(prepared.compiled):
            with torch.no_grad():
                out = prepared.call(inputs.q, inputs.k, inputs.v)  # also rejects unsupported calls before timing
        if cuda:
            torch.cuda.synchronize()
    except Exception as error:  # a peer that rejects the call is reported, not dropped
        if progress:
            print(f"  {name:<9} p={dropout_p:<4} {contender:<28} unavailable: {_error(error)[:90]}")
        return [unavailable_row(name, contender, shape, _error(error), mode=mode, **label)
                for mode in ("fwd", "fwd+bwd")]

    mode_labels, statuses = _statuses(contender, dropout_p, prepared, out, label, inputs, setup)
    del out
    rows = []
    flops = _mode_flops(contender, inputs)
    for mode, call in _timed_calls(prepared, inputs).items():
        try:
            with prepared.hold():
                if prepared.compiled:
                    timings = time_compiled_calls(timer, call, repeats, warmup)
                else:
                    timings = timer(call, repeats=repeats, warmup=warmup)
                with _strict_if(prepared.compiled):
                    peak = _peak_memory_mb(lambda: call(0)) if cuda else None
        except Exception as error:
            rows.append(unavailable_row(name, contender, shape, _error(error), mode=mode, **mode_labels[mode]))
            if progress:
                print(f"  {name:<9} p={dropout_p:<4} {contender:<28} {mode:<8} unavailable: {_error(error)[:80]}")
            continue
        row = result_row(name, contender, shape, timings, mode=mode, peak_memory_mb=peak, **mode_labels[mode])
        row["tflops"] = flops[mode] / (row["median_ms"] * 1e-3) / 1e12
        if statuses[mode]:
            row["status"] = statuses[mode]
        rows.append(row)
        if progress:
            memory = f"{peak:9.1f} MB" if peak is not None else ""
            print(f"  {name:<9} p={dropout_p:<4} {contender:<28} {mode:<8} {row['median_ms']:8.3f} ms "
                  f"{row['tflops']:7.1f} TFLOP/s {memory}" + (f"  {statuses[mode]}" if statuses[mode] else "")
                  + (f"  unsettled (drift {row['drift']:.2f})" if unsettled(row) else ""))
    return rows


def run(repeats: int = 20, warmup: int = 5, dtype: torch.dtype = torch.float16,
        names: Optional[Sequence[str]] = None, contenders: Optional[Sequence[str]] = None,
        progress: bool = True,
        after_scenario: Optional[Callable[[List[Dict[str, object]]], None]] = None,
        device: str = "cuda", scenario_list: Optional[Sequence[Dict[str, object]]] = None,
        compile_backend: str = "inductor") -> List[Dict[str, object]]:
    """Time every contender on every scenario; returns result rows. ``after_scenario`` receives the rows
    so far after each scenario (the CLI writes them, so a run stopped early keeps what it measured).
    ``scenario_list`` replaces :func:`scenarios` (small shapes for tests).

    Each (scenario, dropout) pass times the contenders in :data:`CONTENDERS` order rotated by one more
    than the pass before (the pass's ``timing_position`` is in each row), so no contender is always
    first; the rows keep :data:`CONTENDERS` order whatever the timing order."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats/warmup: expected >= 1 and >= 0, got {repeats} and {warmup}")
    unknown = set(contenders or ()) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"contenders: unknown {sorted(unknown)}; expected names from {list(CONTENDERS)}")
    chosen = list(scenario_list if scenario_list is not None else scenarios())
    unknown = set(names or ()) - {scenario["name"] for scenario in chosen}
    if unknown:
        raise ValueError(f"names: unknown {sorted(unknown)}; expected names from "
                         f"{[scenario['name'] for scenario in chosen]}")
    from torch import _dynamo

    setup = Setup(device, dtype, compile_backend)
    timer = time_cuda_calls if torch.device(device).type == "cuda" else time_host_calls
    selected = [contender for contender in CONTENDERS if not contenders or contender in contenders]
    rows: List[Dict[str, object]] = []
    passes = 0
    for scenario in chosen:
        if names and scenario["name"] not in names:
            continue
        # Dynamo keys its caches on flex_attention's code object, shared by every scenario's compiled
        # wrapper: without a reset, a few scenarios reach its recompile limit and later ones run uncompiled.
        _dynamo.reset()
        inputs = _scenario_inputs(scenario, device, dtype)
        for dropout_p in (0.0, 0.1):  # dropout 0 first: its checks decide whether dropout rows are trusted
            timed = {contender: _contender_rows(contender, dropout_p, position, inputs, setup, timer, repeats,
                                                warmup, progress)
                     for position, contender in enumerate(rotated(selected, passes))}
            rows += [row for contender in selected for row in timed[contender]]
            passes += 1
        rows += _mask_build_rows(scenario, setup, contenders, timer, repeats, inputs.shape, inputs.common)
        if after_scenario is not None:
            after_scenario(rows)
    return rows


def _strict_if(compiled: bool) -> ContextManager:
    return strict_compilation() if compiled else contextlib.nullcontext()


def unsettled_note(rows: Sequence[Dict[str, object]], name_key: str = "contender") -> str:
    """``"  unsettled: <name> (drift d), ..."`` for the rows among ``rows`` whose timings had not settled,
    or ``""``: a ratio that rests on such rows is printed with it, never silently."""
    drifting = [f"{row[name_key]} (drift {row['drift']:.2f})" for row in rows if unsettled(row)]
    return "  unsettled: " + ", ".join(drifting) if drifting else ""


UNSETTLED_FOOTNOTE = (f"unsettled: the median of the first half of the timings differed from the second's by more "
                      f"than a factor {DRIFT_LIMIT} (still warming up, or disturbed); ratios marked so are not "
                      f"reliable")


def speedup_summary(rows: Sequence[Dict[str, object]]) -> str:
    """fastvlp's speed-up over the fastest kernel peer, then the fastvlp module's over torch's module
    called the same way. Rows without a timing or with a status (wrong result, not checked) are left
    out; the DETR-style module row and the mask builds are never compared. A ratio whose rows (fastvlp and
    every kernel peer, or the two modules) include one that had not settled names it at the line's end."""
    lines = ["scenario  p     mode      fastvlp ms  best peer (ms)                      speed-up"]
    groups: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for row in rows:
        if row.get("median_ms") is None or row.get("status") or row.get("mode") == "mask build":
            continue
        groups.setdefault((row["name"], row["dropout_p"], row["mode"]), {})[row["contender"]] = row
    module_lines = []
    for (name, dropout_p, mode), group in groups.items():
        ours = group.get("fastvlp")
        peers = {c: row for c, row in group.items() if c != "fastvlp" and not is_module_row(c)}
        if ours is not None and peers:
            best = min(peers, key=lambda c: peers[c]["median_ms"])
            peer_ms, ours_ms = peers[best]["median_ms"], ours["median_ms"]
            lines.append(f"{name:<9} {dropout_p:<5} {mode:<9} {ours_ms:10.3f}  {best:<22} {peer_ms:9.3f}"
                         f"  {peer_ms / ours_ms:6.2f}x" + unsettled_note([ours, *peers.values()]))
        module, peer = group.get("fastvlp-mha (module)"), group.get("torch-mha (module)")
        if module is not None and peer is not None:
            module_lines.append(f"{name:<9} {dropout_p:<5} {mode:<9} {module['median_ms']:10.3f}  "
                                f"{'torch-mha (module)':<22} {peer['median_ms']:9.3f}  "
                                f"{peer['median_ms'] / module['median_ms']:6.2f}x" + unsettled_note([module, peer]))
    if module_lines:
        lines += ["modules (need_weights=False on both sides):", *module_lines]
    if any("  unsettled: " in line for line in lines):
        lines.append(UNSETTLED_FOOTNOTE)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--scenarios", nargs="*", default=None, help=f"subset of {' '.join(SCENARIO_NAMES)}")
    parser.add_argument("--contenders", nargs="*", default=None, help=f"subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats must be >= 1 and --warmup >= 1 (fastvlp's kernels compile and autotune, and the "
                     "compiled rows compile, in the warm-up)")
    reject_unknown(parser, "--scenarios", args.scenarios, SCENARIO_NAMES)
    reject_unknown(parser, "--contenders", args.contenders, CONTENDERS)
    if not torch.cuda.is_available():
        parser.error("the attention benchmark needs a CUDA GPU")
    device = device_name("cuda")
    print(f"attention on {device}, {args.dtype}, medians of {args.repeats}:")
    columns = ("name", "contender", "mode", "dropout_p", "shape", "median_ms", "tflops", "peak_memory_mb",
               "drift", "settled")

    def write(rows, complete=False):
        return write_results("attention", rows, device, args.out_dir, table_columns=columns, complete=complete,
                             extra={"repeats": args.repeats, "warmup": args.warmup})

    rows = run(args.repeats, args.warmup, getattr(torch, args.dtype), args.scenarios, args.contenders,
               after_scenario=write)
    path = write(rows, complete=True)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(speedup_summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
