"""Fine-tuning heads (VQA, NLVR2, retrieval) against their formulas in float64; shapes, gradients and
argument errors."""
import math

import pytest
import torch

from fastvlp.models.task_heads import ClassifierHead, Nlvr2Head, RetrievalHead, VqaHead


def double(parameter):
    return parameter.detach().double()


def randomize(module):
    """LayerNorm starts at weight 1, bias 0: draw every parameter so the formula checks cover them."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.5)
    return module


def classifier_reference(head: ClassifierHead, x: torch.Tensor) -> torch.Tensor:
    """Linear -> exact GELU -> LayerNorm (biased variance) -> Linear, element by element in float64."""
    x = x.double()
    hidden = x @ double(head.dense.weight).T + double(head.dense.bias)
    erf = torch.tensor([math.erf(value / math.sqrt(2.0)) for value in hidden.flatten().tolist()], dtype=torch.float64)
    hidden = 0.5 * hidden * (1.0 + erf.view(hidden.shape))
    mean = hidden.mean(-1, keepdim=True)
    variance = ((hidden - mean) ** 2).mean(-1, keepdim=True)
    normalised = (hidden - mean) / torch.sqrt(variance + head.layer_norm.eps)
    normalised = normalised * double(head.layer_norm.weight) + double(head.layer_norm.bias)
    return normalised @ double(head.output.weight).T + double(head.output.bias)


def test_classifier_head_matches_formula_on_any_leading_shape():
    torch.manual_seed(0)
    head = randomize(ClassifierHead(6, 10, 5, layer_norm_eps=1e-5))
    assert head.layer_norm.eps == 1e-5
    x = torch.randn(2, 3, 6)
    out = head(x)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out.double(), classifier_reference(head, x), rtol=1e-5, atol=1e-5)


def test_classifier_head_gradcheck_in_float64():
    torch.manual_seed(1)
    head = randomize(ClassifierHead(4, 7, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (x,))


def test_vqa_head_hidden_width_and_values():
    torch.manual_seed(2)
    head = randomize(VqaHead(8, 11))
    assert head.classifier.dense.weight.shape == (16, 8)
    assert head.classifier.output.weight.shape == (11, 16)
    cls = torch.randn(5, 8)
    logits = head(cls)
    assert logits.shape == (5, 11)
    torch.testing.assert_close(logits.double(), classifier_reference(head.classifier, cls), rtol=1e-5, atol=1e-5)
    assert head(torch.randn(0, 8)).shape == (0, 11)


def test_nlvr2_head_concatenates_left_then_right():
    torch.manual_seed(3)
    head = randomize(Nlvr2Head(6))
    assert head.classifier.dense.weight.shape == (12, 12)
    left, right = torch.randn(4, 6), torch.randn(4, 6)
    logits = head(left, right)
    assert logits.shape == (4, 2)
    expected = classifier_reference(head.classifier, torch.cat((left, right), 1))
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    # The pair is ordered: swapping the images changes the logits.
    assert not torch.allclose(head(right, left), logits, atol=1e-3)


def test_nlvr2_head_gradients_reach_both_inputs():
    torch.manual_seed(4)
    head = randomize(Nlvr2Head(3)).double()
    left = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    right = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (left, right))


def test_retrieval_head_is_one_linear_score():
    torch.manual_seed(5)
    head = randomize(RetrievalHead(7))
    cls = torch.randn(6, 7)
    scores = head(cls)
    assert scores.shape == (6,)
    expected = [sum(cls[i, k].item() * head.score.weight[0, k].item() for k in range(7)) + head.score.bias.item()
                for i in range(6)]
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    cls64 = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head.double(), (cls64,))


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "8"])
def test_constructors_reject_bad_sizes(bad):
    with pytest.raises(ValueError, match="input_dim"):
        ClassifierHead(bad, 4, 2)
    with pytest.raises(ValueError, match="hidden_dim"):
        ClassifierHead(4, bad, 2)
    with pytest.raises(ValueError, match="num_outputs"):
        ClassifierHead(4, 4, bad)
    with pytest.raises(ValueError, match="d_model"):
        VqaHead(bad, 3)
    with pytest.raises(ValueError, match="num_answers"):
        VqaHead(4, bad)
    with pytest.raises(ValueError, match="d_model"):
        Nlvr2Head(bad)
    with pytest.raises(ValueError, match="d_model"):
        RetrievalHead(bad)


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.inf, math.nan, "1e-5"])
def test_classifier_head_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="layer_norm_eps"):
        ClassifierHead(4, 4, 2, layer_norm_eps=eps)


def test_forward_rejects_bad_inputs():
    torch.manual_seed(6)
    with pytest.raises(ValueError, match="x"):
        ClassifierHead(4, 4, 2)(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x"):
        ClassifierHead(4, 4, 2)(torch.randint(0, 3, (3, 4)))
    vqa = VqaHead(4, 3)
    with pytest.raises(ValueError, match="cls_hidden"):
        vqa(torch.randn(2, 5))
    with pytest.raises(ValueError, match="cls_hidden"):
        vqa(torch.randn(2, 1, 4))
    with pytest.raises(TypeError, match="cls_hidden"):
        vqa([[1.0, 2.0, 3.0, 4.0]])
    nlvr2 = Nlvr2Head(4)
    with pytest.raises(ValueError, match="right_cls"):
        nlvr2(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="left_cls"):
        nlvr2(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(TypeError, match="right_cls"):
        nlvr2(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="cls_hidden"):
        RetrievalHead(4)(torch.randn(4))
