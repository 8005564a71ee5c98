"""The whole E2E-VLP pre-training step with the Triton kernels and the fastvlp matcher against
torch.nn.MultiheadAttention and scipy: same weights, same batch, fp32, dropout off.

On a GPU the kernels run on CUDA; without one they run in Triton's CPU interpreter, which must be
switched on before the kernels are defined, hence the environment line first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvlp.nn.matcher as matcher_module  # noqa: E402
from fastvlp.models import E2EVLP, make_pretraining_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from test_model_e2e_vlp import (  # noqa: E402  the same tiny vocabulary, label spaces and token rows
    MASK, SPECIAL, VOCAB, random_targets, small_config, token_rows,
)
ROLES = {"encoder_self_attention", "decoder_self_attention", "decoder_causal_self_attention", "decoder_cross_attention"}

# Both sides compute in fp32 with the same weights; they differ only in the order of the attention's
# sums (the kernels' online softmax over key tiles against one softmax over all keys), a rounding
# difference of about 1e-7 relative per attention output. Through two encoder and two decoder layers, the
# heads and the backward it stayed below 2e-7 of a loss and grew to about 2e-6 of a gradient's largest
# value in the interpreter (the backbone's, which every path flows into); the tolerances leave 10x of room,
# and a 1e-4 relative change to one attention's weights already moves a gradient by 1e-2. Errors are scaled
# by each tensor's largest magnitude, since a gradient's near-zero elements carry only that absolute error.
LOSS_TOLERANCE = 2e-6
GRAD_TOLERANCE = 2e-5


def _kernels_runnable():
    if DEVICE == "cuda":
        return True
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    return kernels_interpreted()


pytestmark = [
    pytest.mark.skipif(
        not _kernels_runnable(),
        reason="fastvlp's Triton kernels were imported before TRITON_INTERPRET=1 was set; run this file on its own",
    ),
    pytest.mark.usefixtures("one_thread"),
]


def tiny_config(**overrides):
    return small_config(**{"num_heads": 2, "num_queries": 5, "max_text_len": 8, "aux_loss": True, **overrides})


def tiny_batch(seed=0):
    """Three images of 64x96 (2x3 feature cells) with padding, texts and captions of unequal lengths, and
    boxes; seed 0 leaves two rows matched, so MLM and detection both run."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 64, 96, generator=generator)
    pixel_mask = torch.zeros(3, 64, 96, dtype=torch.bool)
    pixel_mask[1, :, 60:] = True  # right padding: one feature column
    pixel_mask[2, 40:, :] = True  # bottom padding: one feature row
    images = images.masked_fill(pixel_mask[:, None], 0.0)
    text_ids, text_mask = token_rows([8, 5, 7], 8, generator)
    caption_ids, caption_mask = token_rows([6, 4, 6], 6, generator)
    targets = random_targets((3, 2, 4), generator)
    batch = make_pretraining_batch(
        images, pixel_mask, text_ids, text_mask, special_token_ids=SPECIAL, mask_token_id=MASK, vocab_size=VOCAB,
        caption_ids=caption_ids, caption_attention_mask=caption_mask, targets=targets, generator=generator,
        mlm_probability=0.4,
    )
    return batch.to(DEVICE)


@pytest.fixture
def fp32_matmuls():
    """TF32 off on a GPU, so that both sides' convolutions and matmuls are fp32 (no effect on the CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _scaled_error(actual, expected):
    """Largest absolute difference over the expected tensor's largest magnitude."""
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _run_step(model, batch):
    """One training forward and backward: the losses, the gradients by name, and each matcher call's
    matches as sets of (query, target) pairs per image."""
    matches = []
    matcher = model.criterion.matcher
    hook = matcher.register_forward_hook(
        lambda module, args, output: matches.append(
            [set(zip(rows.tolist(), cols.tolist())) for rows, cols in output]
        )
    )
    real_assign = matcher.assign

    def recorded_assign(*args, **kwargs):  # the criterion's dense path (the batched solver) calls this instead
        assignment = real_assign(*args, **kwargs)
        matches.append([{(query, target) for query, target in enumerate(row) if target >= 0}
                        for row in assignment.tolist()])
        return assignment

    matcher.assign = recorded_assign
    try:
        output = model(batch)
        output.loss.backward()
    finally:
        hook.remove()
        del matcher.assign
    losses = {name: value.detach() for name, value in output.losses.items()}
    losses["loss"] = output.loss.detach()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads, matches


def test_triton_and_fastvlp_matcher_match_torch_and_scipy(fp32_matmuls, monkeypatch):
    torch.manual_seed(0)
    fast = E2EVLP(tiny_config(attention_backend="triton", matcher_backend="fastvlp")).to(DEVICE).train()
    baseline = E2EVLP(tiny_config(attention_backend="torch", matcher_backend="scipy")).to(DEVICE).train()
    baseline.load_state_dict(fast.state_dict())
    batch = tiny_batch()

    solver_calls = []  # the fastvlp solver, counted to show which side called it
    real_solver = matcher_module.batched_linear_sum_assignment

    def counted_solver(*args, **kwargs):
        solver_calls.append(args[0].device.type)
        return real_solver(*args, **kwargs)

    monkeypatch.setattr(matcher_module, "batched_linear_sum_assignment", counted_solver)

    base_losses, base_grads, base_matches = _run_step(baseline, batch)
    assert solver_calls == []  # scipy's side never reaches the fastvlp solver
    fast_losses, fast_grads, fast_matches = _run_step(fast, batch)
    assert solver_calls and set(solver_calls) == {torch.device(DEVICE).type}

    # Every task ran, detection with its auxiliary (first decoder layer) losses.
    assert {"loss_mlm", "loss_itm", "loss_det", "loss_cap", "loss_ce", "loss_bbox", "loss_giou",
            "loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(base_losses)
    assert fast_losses.keys() == base_losses.keys()
    for name, expected in base_losses.items():
        error = _scaled_error(fast_losses[name], expected)
        assert error <= LOSS_TOLERANCE, f"{name}: {fast_losses[name].item()} vs {expected.item()} (error {error:.2e})"
    # The optimal assignments agree exactly (the losses would differ by far more otherwise).
    assert fast_matches == base_matches and len(base_matches) >= 1

    # Every parameter that took part has a gradient on both sides, the backbone's included.
    assert fast_grads.keys() == base_grads.keys()
    assert any(name.startswith("backbone.") for name in base_grads) and len(base_grads) > 100
    errors = {name: _scaled_error(fast_grads[name], grad) for name, grad in base_grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOLERANCE, f"{worst}: error {errors[worst]:.2e}"

    report = fast.backend_report()
    assert report["attention"] == "triton" and set(report["attention_by_role"]) == ROLES
    assert report["matcher"] == "fastvlp" and report["matcher_device"] == torch.device(DEVICE).type
    base_report = baseline.backend_report()
    assert base_report["attention"] == "torch.nn.MultiheadAttention" and base_report["matcher"] == "scipy"
