"""Fine-tuning losses against float64 references written as plain loops: VQA soft BCE, label-smoothed
token cross-entropy, circle loss and hard-negative mining; gradients, empty inputs, ties, large values and
argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvlp.models.task_losses import circle_loss, hard_negative_indices, label_smoothed_token_loss, vqa_soft_bce

SOFT_SCORES = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0])


def soft_targets(rows, answers, generator=None):
    return SOFT_SCORES[torch.randint(0, 5, (rows, answers), generator=generator)]


# ---------------------------------------------------------------- VQA soft BCE

def vqa_reference(logits, targets):
    """sum over answers of -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], averaged over questions,
    with log sigmoid written overflow-free: log sigmoid(x) = -log1p(exp(-x)) for x >= 0."""
    def log_sigmoid(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    rows, answers = logits.shape
    total = 0.0
    for i in range(rows):
        for a in range(answers):
            x, t = float(logits[i, a]), float(targets[i, a])
            total -= t * log_sigmoid(x) + (1.0 - t) * log_sigmoid(-x)
    return total / rows


def test_vqa_soft_bce_matches_reference_and_convention():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 9) * 3, soft_targets(5, 9)
    targets[0, 3] = 0.47  # any score in [0, 1] is accepted, not only the five annotator levels
    loss = vqa_soft_bce(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(vqa_reference(logits, targets), rel=1e-5)
    # The convention: element mean times the number of answers.
    expected = F.binary_cross_entropy_with_logits(logits.double(), targets.double()) * 9
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_vqa_soft_bce_is_float32_for_half_inputs_and_finite_for_large_logits():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, dtype=torch.float64) * 1e4
    targets = soft_targets(3, 6).double()
    loss = vqa_soft_bce(logits.to(torch.bfloat16), targets.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss64 = vqa_soft_bce(logits, targets)
    assert loss64.dtype == torch.float64
    assert loss64.item() == pytest.approx(vqa_reference(logits, targets), rel=1e-9)


def test_vqa_soft_bce_gradcheck_and_empty_batch():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    targets = soft_targets(3, 4).double()
    assert torch.autograd.gradcheck(lambda x: vqa_soft_bce(x, targets), (logits,))
    empty = torch.randn(0, 4, requires_grad=True)
    loss = vqa_soft_bce(empty, torch.zeros(0, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert empty.grad is not None and empty.grad.shape == (0, 4)


def test_vqa_soft_bce_rejects_bad_inputs():
    logits, targets = torch.randn(2, 3), soft_targets(2, 3)
    with pytest.raises(ValueError, match="targets"):
        vqa_soft_bce(logits, targets[:, :2])
    with pytest.raises(ValueError, match="targets"):
        vqa_soft_bce(logits, targets + 1.5)
    with pytest.raises(ValueError, match="targets"):
        vqa_soft_bce(logits, targets - 1.5)
    with pytest.raises(TypeError, match="targets"):
        vqa_soft_bce(logits, targets.long())
    with pytest.raises(ValueError, match="logits"):
        vqa_soft_bce(logits.flatten(), targets.flatten())
    bad = logits.clone()
    bad[1, 2] = math.inf
    with pytest.raises(ValueError, match="logits"):
        vqa_soft_bce(bad, targets)
    with pytest.raises(TypeError, match="logits"):
        vqa_soft_bce(logits.numpy(), targets)


# ---------------------------------------------------------------- label-smoothed token loss

def smoothed_reference(logits, labels, smoothing, ignore_index=-100):
    """Per kept label: (1 - eps) * nll(label) + eps * mean over the vocabulary of nll(v); loops in float64."""
    flat_logits = logits.double().reshape(-1, logits.shape[-1])
    total, count = 0.0, 0
    for row, label in zip(flat_logits.tolist(), labels.flatten().tolist()):
        if label == ignore_index:
            continue
        peak = max(row)
        log_z = peak + math.log(sum(math.exp(value - peak) for value in row))
        nll = [log_z - value for value in row]
        total += (1.0 - smoothing) * nll[label] + smoothing * sum(nll) / len(nll)
        count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35])
def test_label_smoothed_loss_matches_reference_and_torch(smoothing):
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 7) * 2
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 1] = labels[1, 4] = -100
    loss = label_smoothed_token_loss(logits, labels, smoothing=smoothing)
    assert loss.item() == pytest.approx(smoothed_reference(logits, labels, smoothing), rel=1e-5)
    torch_loss = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), label_smoothing=smoothing)
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-5)


def test_label_smoothed_loss_custom_ignore_index_and_int32_labels():
    torch.manual_seed(4)
    logits = torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,), dtype=torch.int32)
    labels[2] = 0
    loss = label_smoothed_token_loss(logits, labels, smoothing=0.2, ignore_index=0)
    assert loss.item() == pytest.approx(smoothed_reference(logits, labels.long(), 0.2, ignore_index=0), rel=1e-5)


def test_label_smoothed_loss_all_ignored_is_attached_zero():
    torch.manual_seed(5)
    logits = torch.randn(3, 4, 6, requires_grad=True)
    loss = label_smoothed_token_loss(logits, torch.full((3, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    empty = torch.randn(0, 6, requires_grad=True)
    assert label_smoothed_token_loss(empty, torch.zeros(0, dtype=torch.int64)).item() == 0.0


def test_label_smoothed_loss_large_logits_and_ignored_infinities_stay_finite():
    torch.manual_seed(6)
    logits = (torch.randn(4, 9) * 1e4).requires_grad_()
    labels = torch.randint(0, 9, (4,))
    loss = label_smoothed_token_loss(logits, labels)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(smoothed_reference(logits.detach(), labels, 0.1), rel=1e-5)
    # An ignored position may hold -inf logits (e.g. banned tokens): it must not turn the loss into nan.
    with_inf = torch.randn(3, 5)
    with_inf[1, 2] = -math.inf
    with_inf.requires_grad_()
    labels = torch.tensor([4, -100, 0])
    loss = label_smoothed_token_loss(with_inf, labels)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(with_inf.grad).all()
    assert loss.item() == pytest.approx(smoothed_reference(with_inf.detach()[[0, 2]], labels[[0, 2]], 0.1), rel=1e-5)


def test_label_smoothed_loss_gradcheck():
    torch.manual_seed(7)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 4, 0])
    assert torch.autograd.gradcheck(lambda x: label_smoothed_token_loss(x, labels, smoothing=0.15), (logits,))


def test_label_smoothed_loss_rejects_bad_inputs():
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="labels"):
        label_smoothed_token_loss(logits, labels[:, :2])
    with pytest.raises(ValueError, match="labels"):
        label_smoothed_token_loss(logits, labels + 5)
    with pytest.raises(ValueError, match="labels"):
        label_smoothed_token_loss(logits, labels.masked_fill(labels == labels[0, 0], -3))
    with pytest.raises(TypeError, match="labels"):
        label_smoothed_token_loss(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        label_smoothed_token_loss(logits.long(), labels)
    for smoothing in (-0.1, 1.5, math.nan, True):
        with pytest.raises(ValueError, match="smoothing"):
            label_smoothed_token_loss(logits, labels, smoothing=smoothing)
    with pytest.raises(TypeError, match="ignore_index"):
        label_smoothed_token_loss(logits, labels, ignore_index=-100.0)


# ---------------------------------------------------------------- circle loss

def circle_reference(positive, negative, margin, gamma):
    """Per row log(1 + sum_j exp(l_n_j) * exp(l_p)) with the paper's weights, as a stable log-sum-exp over
    the terms {0, l_n_j + l_p}; mean over rows."""
    rows = []
    for s_p, row in zip(positive.tolist(), negative.tolist()):
        l_p = -gamma * max(1 + margin - s_p, 0.0) * (s_p - (1 - margin))
        terms = [0.0] + [gamma * max(s_n + margin, 0.0) * (s_n - margin) + l_p for s_n in row]
        peak = max(terms)
        rows.append(peak + math.log(sum(math.exp(term - peak) for term in terms)))
    return sum(rows) / len(rows)


def circle_gradient_reference(positive, negative, margin, gamma):
    """d loss / d s with the weights alpha held constant (detached, as the paper trains them)."""
    batch, k = negative.shape
    grad_p, grad_n = torch.zeros(batch, dtype=torch.float64), torch.zeros(batch, k, dtype=torch.float64)
    for i in range(batch):
        s_p = float(positive[i])
        alpha_p = max(1 + margin - s_p, 0.0)
        alpha_n = [max(float(s) + margin, 0.0) for s in negative[i]]
        l_n = [gamma * a * (float(s) - margin) for a, s in zip(alpha_n, negative[i])]
        z = math.log(sum(math.exp(v) for v in l_n)) - gamma * alpha_p * (s_p - (1 - margin))
        outer = 1.0 / (1.0 + math.exp(-z)) / batch  # softplus' = sigmoid, then the row mean
        grad_p[i] = outer * -gamma * alpha_p
        weights = [math.exp(v - max(l_n)) for v in l_n]
        for j in range(k):
            grad_n[i, j] = outer * weights[j] / sum(weights) * gamma * alpha_n[j]
    return grad_p, grad_n


@pytest.mark.parametrize("margin,gamma", [(0.25, 32.0), (0.4, 8.0), (0.0, 1.0)])
def test_circle_loss_matches_reference_and_gradients(margin, gamma):
    torch.manual_seed(8)
    positive = torch.rand(5, dtype=torch.float64).requires_grad_()
    negative = torch.rand(5, 3, dtype=torch.float64).requires_grad_()
    loss = circle_loss(positive, negative, margin=margin, gamma=gamma)
    assert loss.item() == pytest.approx(circle_reference(positive.detach(), negative.detach(), margin, gamma), rel=1e-10)
    loss.backward()
    grad_p, grad_n = circle_gradient_reference(positive.detach(), negative.detach(), margin, gamma)
    torch.testing.assert_close(positive.grad, grad_p, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(negative.grad, grad_n, rtol=1e-9, atol=1e-12)


def test_circle_loss_orders_easy_and_hard_rows_and_uses_float32():
    torch.manual_seed(9)
    negative = torch.rand(4, 6) * 0.2
    easy = circle_loss(torch.full((4,), 0.95), negative)
    hard = circle_loss(torch.full((4,), 0.95), negative + 0.75)
    assert 0 < easy.item() < hard.item()
    half = circle_loss(torch.rand(4).half(), torch.rand(4, 6).half())
    assert half.dtype == torch.float32


def test_circle_loss_large_gamma_is_finite():
    torch.manual_seed(10)
    positive, negative = torch.rand(3), torch.rand(3, 4)
    negative[0, 0], positive[0] = 1.0, 0.0  # the hardest row: exponent gamma * 1.25 * 0.75 + gamma * 1.25 * 0.75
    loss = circle_loss(positive.requires_grad_(), negative.requires_grad_(), gamma=4096.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(positive.grad).all() and torch.isfinite(negative.grad).all()
    assert loss.item() == pytest.approx(circle_reference(positive.detach().double(), negative.detach().double(), 0.25, 4096.0), rel=1e-5)


def test_circle_loss_empty_batch_is_attached_zero():
    positive = torch.rand(0, requires_grad=True)
    negative = torch.rand(0, 3, requires_grad=True)
    loss = circle_loss(positive, negative)
    assert loss.item() == 0.0
    loss.backward()
    assert positive.grad.shape == (0,) and negative.grad.shape == (0, 3)


def test_circle_loss_rejects_bad_inputs():
    positive, negative = torch.rand(3), torch.rand(3, 2)
    with pytest.raises(ValueError, match="negative"):
        circle_loss(positive, negative[:2])
    with pytest.raises(ValueError, match="negative"):
        circle_loss(positive, torch.rand(3, 0))
    with pytest.raises(ValueError, match="positive"):
        circle_loss(positive[:, None], negative)
    with pytest.raises(ValueError, match="positive"):
        circle_loss(positive + 1.5, negative)
    with pytest.raises(ValueError, match="negative"):
        circle_loss(positive, negative - 1.5)
    with pytest.raises(TypeError, match="negative"):
        circle_loss(positive, negative.long())
    for gamma in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="gamma"):
            circle_loss(positive, negative, gamma=gamma)
    for margin in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="margin"):
            circle_loss(positive, negative, margin=margin)


# ---------------------------------------------------------------- hard negatives

def hard_negative_reference(scores, k):
    batch = len(scores)
    return [sorted((j for j in range(batch) if j != i), key=lambda j: (-scores[i][j], j))[:k] for i in range(batch)]


@pytest.mark.parametrize("batch,k", [(2, 1), (5, 2), (7, 6)])
def test_hard_negatives_match_reference(batch, k):
    torch.manual_seed(11)
    scores = torch.randn(batch, batch)
    scores.diagonal().add_(3.0)  # a large positive is never its own negative
    found = hard_negative_indices(scores, k)
    assert found.dtype == torch.int64 and found.shape == (batch, k)
    assert found.tolist() == hard_negative_reference(scores.tolist(), k)


def test_hard_negatives_break_ties_by_lower_index_and_handle_infinities():
    torch.manual_seed(12)
    scores = torch.randint(0, 3, (9, 9)).float()  # many ties
    scores[2, 5] = scores[2, 7] = math.inf
    scores[4] = -math.inf  # a whole row of -inf: the lowest other indices win
    scores[6, 6] = math.inf  # a huge positive stays excluded
    found = hard_negative_indices(scores, 4)
    assert found.tolist() == hard_negative_reference(scores.tolist(), 4)
    assert found[2, :2].tolist() == [5, 7] and found[4].tolist() == [0, 1, 2, 3]
    assert not (found == torch.arange(9)[:, None]).any()


def test_hard_negatives_reject_bad_inputs():
    scores = torch.randn(4, 4)
    for k in (0, 4, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_negatives"):
            hard_negative_indices(scores, k)
    with pytest.raises(ValueError, match="scores"):
        hard_negative_indices(torch.randn(4, 3), 1)
    with pytest.raises(TypeError, match="scores"):
        hard_negative_indices(torch.randint(0, 5, (4, 4)), 1)
    with_nan = scores.clone()
    with_nan[1, 2] = math.nan
    with pytest.raises(ValueError, match="scores"):
        hard_negative_indices(with_nan, 1)
    with pytest.raises(ValueError, match="num_negatives"):
        hard_negative_indices(torch.randn(1, 1), 1)
