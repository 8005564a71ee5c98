"""Fused attention against its peers, on E2E-VLP's own attention shapes (GPU).

Scenarios (H=8, D=32 unless noted; ``[B, L, H, D]`` tensors):
  E         encoder self-attention, B=32, L=1090 (40 text + 30x35 image tokens), ~20% key
            padding interleaved along image rows (DETR's 2-D padding, flattened)
  X         decoder cross-attention, 100 queries to E's 1090 keys and padding
  S         decoder self-attention, 100x100, no mask
  C-self    caption self-attention, causal 40x40 with text padding
  C-cross   40 caption queries to E's 1090 keys and padding
  standard  B=4, H=16, L=4096, D=64, no mask
each at dropout 0 and 0.1, forward alone and forward+backward.

Contenders: fastvlp's Triton kernels; SDPA under each of its backends (flash,
efficient, cudnn, math), rows for the ones that reject the call; FlexAttention
compiled, with a BlockMask built outside the timing (dropout 0 only; the build is
timed as its own row); xformers' memory_efficient_attention when installed; and, as
DETR calls it, ``nn.MultiheadAttention`` (``need_weights`` left True) against
``fastvlp.nn.MultiheadAttention`` called for its fused path (``need_weights=False``,
``is_causal`` with the causal mask): these two module rows include the input and
output projections, so compare them with each other, not with the kernel rows.

TFLOP/s count only unmasked work: 4*D per visible (query, key) pair per head
forward, 3.5 times that for forward+backward. Peak memory is the allocator's peak
above the inputs during one call.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastvlp.bench.common import device_name, result_row, time_cuda_calls, unavailable_row, write_results

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
        dict(name="standard", batch=4, heads=16, head_dim=64, query_length=4096, key_length=4096, mask=None,
             causal=False),
    ]


# ---------------------------------------------------------------- contenders
# Each builder returns a function (q, k, v) -> output on [B, L, H, D] tensors, or
# raises with the reason it cannot take the call.

def _fastvlp(scenario, dropout_p):
    from fastvlp.ops.fmha.dispatch import attention

    mask, causal = scenario["mask"], scenario["causal"]
    return lambda q, k, v: attention(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=dropout_p,
                                     backend="triton")


def _keep_mask(scenario, device):
    """Bool ``[B, 1, Lq, Lk]`` (True = attend) for peers that take a dense mask, or None."""
    mask, causal = scenario["mask"], scenario["causal"]
    query_length, key_length = scenario["query_length"], scenario["key_length"]
    if mask is None and not causal:
        return None
    keep = torch.ones(scenario["batch"], 1, query_length, key_length, dtype=torch.bool, device=device)
    if mask is not None:
        keep &= ~mask[:, None, None, :]
    if causal:
        rows = torch.arange(query_length, device=device)[:, None]
        keep &= torch.arange(key_length, device=device)[None, :] <= rows + key_length - query_length
    return keep


def _sdpa(backend_name):
    def build(scenario, dropout_p):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        backend = getattr(SDPBackend, backend_name)
        only_causal = scenario["causal"] and scenario["mask"] is None and \
            scenario["query_length"] == scenario["key_length"]
        keep = None if only_causal else _keep_mask(scenario, "cuda")
        if keep is not None and scenario["mask"] is not None and not scenario["causal"]:
            keep = keep[:, :, :1, :]  # [B, 1, 1, Lk]: broadcast over queries, as DETR-style padding is

        def call(q, k, v):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=keep, dropout_p=dropout_p, is_causal=only_causal)
            return out.transpose(1, 2)

        return call

    return build


def _flex(scenario, dropout_p):
    if dropout_p > 0:
        raise RuntimeError("FlexAttention has no dropout")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask, causal = scenario["mask"], scenario["causal"]
    offset = scenario["key_length"] - scenario["query_length"]

    def mask_mod(b, h, q_index, kv_index):
        keep = kv_index >= 0
        if mask is not None:
            keep = keep & ~mask[b, kv_index]
        if causal:
            keep = keep & (kv_index <= q_index + offset)
        return keep

    block_mask = create_block_mask(mask_mod, scenario["batch"], None, scenario["query_length"],
                                   scenario["key_length"], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(q, k, v):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return call


def _flex_block_mask_build(scenario):
    from torch.nn.attention.flex_attention import create_block_mask

    mask, causal = scenario["mask"], scenario["causal"]
    offset = scenario["key_length"] - scenario["query_length"]

    def mask_mod(b, h, q_index, kv_index):
        keep = kv_index >= 0
        if mask is not None:
            keep = keep & ~mask[b, kv_index]
        if causal:
            keep = keep & (kv_index <= q_index + offset)
        return keep

    return lambda: create_block_mask(mask_mod, scenario["batch"], None, scenario["query_length"],
                                     scenario["key_length"], device="cuda")


def _xformers(scenario, dropout_p):
    import xformers.ops as xops

    keep = _keep_mask(scenario, "cuda")
    heads, query_length, key_length = scenario["heads"], scenario["query_length"], scenario["key_length"]
    if keep is None:
        bias = None
    elif scenario["mask"] is None and scenario["causal"]:
        bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    else:
        # A dense additive bias, the only form xformers takes for arbitrary padding;
        # its last dim is allocated to a multiple of 8 as the kernels require.
        padded = (key_length + 7) // 8 * 8
        storage = torch.zeros(scenario["batch"], heads, query_length, padded, device="cuda", dtype=torch.float16)
        bias = storage[..., :key_length]
        bias.masked_fill_(~keep.expand(-1, heads, -1, -1), float("-inf"))

    def call(q, k, v):
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)

    return call


def _module_arguments(kind: str, scenario, device) -> Dict[str, object]:
    """Keyword arguments of a module row's call. ``"torch"``: as DETR calls ``nn.MultiheadAttention``
    (``need_weights`` left True, causality as a bool ``attn_mask``). ``"fastvlp"``: the call that takes
    fastvlp's fused path (``need_weights=False``, and the causal mask with the ``is_causal`` hint)."""
    if kind not in ("torch", "fastvlp"):
        raise ValueError(f"kind: expected 'torch' or 'fastvlp', got {kind!r}")
    mask, causal = scenario["mask"], scenario["causal"]
    attn_mask = None
    if causal:
        query_length, key_length = scenario["query_length"], scenario["key_length"]
        rows = torch.arange(query_length, device=device)[:, None]
        attn_mask = torch.arange(key_length, device=device)[None, :] > rows + key_length - query_length
    arguments = dict(key_padding_mask=mask, attn_mask=attn_mask)
    if kind == "fastvlp":
        arguments.update(need_weights=False, is_causal=causal)
    return arguments


def _module_call(kind: str, scenario, dropout_p: float, device, dtype: torch.dtype):
    """``(module, call)``: a ``kind`` MultiheadAttention of the scenario's width on ``device`` in training
    mode, and a function (q, k, v) -> output on ``[B, L, H, D]`` tensors that runs it as the row does."""
    heads, head_dim = scenario["heads"], scenario["head_dim"]
    width = heads * head_dim
    if kind == "torch":
        module = torch.nn.MultiheadAttention(width, heads, dropout=dropout_p)
    else:
        from fastvlp.nn.multihead_attention import MultiheadAttention

        module = MultiheadAttention(width, heads, dropout=dropout_p)
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
    def build(scenario, dropout_p):
        return _module_call(kind, scenario, dropout_p, "cuda", _DTYPE[0])[1]

    return build


_DTYPE = [torch.float16]  # set by run(); the module builders read it

CONTENDERS: Dict[str, Callable] = {
    "fastvlp": _fastvlp,
    **{f"sdpa-{name.split('_')[0].lower()}": _sdpa(name) for name in SDPA_BACKENDS},
    "flex-compiled": _flex,
    "xformers": _xformers,
    "torch-mha-detr (module)": _module("torch"),
    "fastvlp-mha (module)": _module("fastvlp"),
}


# ---------------------------------------------------------------- measurement

def _peak_memory_mb(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text[:300]


def run(repeats: int = 20, warmup: int = 5, dtype: torch.dtype = torch.float16,
        names: Optional[Sequence[str]] = None, contenders: Optional[Sequence[str]] = None,
        progress: bool = True,
        after_scenario: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Time every contender on every scenario; returns result rows. ``after_scenario`` receives the rows
    so far after each scenario (the CLI writes them, so a run stopped early keeps what it measured)."""
    _DTYPE[0] = dtype
    rows: List[Dict[str, object]] = []
    for scenario in scenarios():
        if names and scenario["name"] not in names:
            continue
        batch, heads, head_dim = scenario["batch"], scenario["heads"], scenario["head_dim"]
        query_length, key_length = scenario["query_length"], scenario["key_length"]
        if scenario["mask"] is not None:
            scenario["mask"] = scenario["mask"].cuda()
        pairs = visible_pairs(batch, query_length, key_length, scenario["mask"], scenario["causal"])
        forward_flops = 4.0 * head_dim * heads * pairs
        shape = f"B{batch} H{heads} D{head_dim} {query_length}x{key_length}"
        generator = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(batch, query_length, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
        k = torch.randn(batch, key_length, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
        v = torch.randn(batch, key_length, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
        grad_out = torch.randn_like(q)
        padded = 0.0 if scenario["mask"] is None else float(scenario["mask"].float().mean())
        common = dict(visible_pairs=pairs, key_padding_fraction=round(padded, 4), causal=scenario["causal"],
                      dtype=str(dtype).replace("torch.", ""))

        for dropout_p in (0.0, 0.1):
            reference_out = None
            for contender, builder in CONTENDERS.items():
                if contenders and contender not in contenders:
                    continue
                label = dict(common, dropout_p=dropout_p)
                try:
                    function = builder(scenario, dropout_p)
                    with torch.no_grad():
                        out = function(q, k, v)  # also rejects unsupported calls before timing
                    torch.cuda.synchronize()
                except Exception as error:  # a peer that rejects the call is reported, not dropped
                    for mode in ("fwd", "fwd+bwd"):
                        rows.append(unavailable_row(scenario["name"], contender, shape, _error(error), mode=mode,
                                                    **label))
                    if progress:
                        print(f"  {scenario['name']:<9} p={dropout_p:<4} {contender:<24} unavailable: "
                              f"{_error(error)[:90]}")
                    continue
                if dropout_p == 0.0:
                    if contender == "fastvlp":
                        reference_out = out.float()
                    elif reference_out is not None and not contender.endswith("(module)"):
                        label["max_abs_diff_vs_fastvlp"] = float((out.float() - reference_out).abs().max())

                inputs = [t.detach().requires_grad_() for t in (q, k, v)]

                def forward(_, function=function):
                    with torch.no_grad():
                        function(q, k, v)

                def forward_backward(_, function=function, inputs=inputs):
                    function(*inputs).backward(grad_out)
                    for t in inputs:
                        t.grad = None

                for mode, call, flops in (("fwd", forward, forward_flops),
                                          ("fwd+bwd", forward_backward, 3.5 * forward_flops)):
                    try:
                        timings = time_cuda_calls(call, repeats=repeats, warmup=warmup)
                        peak = _peak_memory_mb(lambda: call(0))
                    except Exception as error:
                        rows.append(unavailable_row(scenario["name"], contender, shape, _error(error), mode=mode,
                                                    **label))
                        continue
                    row = result_row(scenario["name"], contender, shape, timings, mode=mode, peak_memory_mb=peak,
                                     **label)
                    row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                    rows.append(row)
                    if progress:
                        print(f"  {scenario['name']:<9} p={dropout_p:<4} {contender:<24} {mode:<8} "
                              f"{row['median_ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s {peak:9.1f} MB")

        if not contenders or "flex-compiled" in contenders:
            try:
                build = _flex_block_mask_build(scenario)
                timings = time_cuda_calls(lambda _: build(), repeats=max(3, repeats // 4), warmup=1)
                rows.append(result_row(scenario["name"], "flex-blockmask-build", shape, timings, mode="mask build",
                                       **common, dropout_p=0.0))
            except Exception as error:
                rows.append(unavailable_row(scenario["name"], "flex-blockmask-build", shape, _error(error),
                                            mode="mask build", **common, dropout_p=0.0))
        if after_scenario is not None:
            after_scenario(rows)
    return rows


def speedup_summary(rows: Sequence[Dict[str, object]]) -> str:
    """fastvlp's speed-up over the fastest accepting SDPA backend and the other kernel peers."""
    lines = ["scenario  p     mode      fastvlp ms  best peer (ms)                      speed-up"]
    groups: Dict[tuple, Dict[str, float]] = {}
    for row in rows:
        if row.get("median_ms") is None or row.get("mode") == "mask build":
            continue
        key = (row["name"], row["dropout_p"], row["mode"])
        groups.setdefault(key, {})[row["contender"]] = row["median_ms"]
    for (name, dropout_p, mode), times in groups.items():
        ours = times.get("fastvlp")
        peers = {c: t for c, t in times.items() if c != "fastvlp" and not c.endswith("(module)")}
        if ours is None or not peers:
            continue
        best = min(peers, key=peers.get)
        lines.append(f"{name:<9} {dropout_p:<5} {mode:<9} {ours:10.3f}  {best:<22} {peers[best]:9.3f}"
                     f"  {peers[best] / ours:6.2f}x")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--scenarios", nargs="*", default=None, help="subset of E X S C-self C-cross standard")
    parser.add_argument("--contenders", nargs="*", default=None, help=f"subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not torch.cuda.is_available():
        parser.error("the attention benchmark needs a CUDA GPU")
    device = device_name("cuda")
    print(f"attention on {device}, {args.dtype}, medians of {args.repeats}:")
    columns = ("name", "contender", "mode", "dropout_p", "shape", "median_ms", "tflops", "peak_memory_mb")

    def write(rows):
        return write_results("attention", rows, device, args.out_dir, table_columns=columns)

    rows = run(args.repeats, args.warmup, getattr(torch, args.dtype), args.scenarios, args.contenders,
               after_scenario=write)
    path = write(rows)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(speedup_summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
