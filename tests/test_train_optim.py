import pytest
import torch

from fastvlp.models import E2EVLP, get_preset
from fastvlp.train.optim import build_optimizer, group_learning_rate, split_decay_groups


def test_groups_split_norms_and_biases_out_of_weight_decay():
    config = get_preset("tiny", d_model=32, num_heads=2, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                        num_queries=3, vocab_size=50, num_classes=4, num_attributes=3, lr_backbone=3e-5)
    model = E2EVLP(config)
    optimizer = build_optimizer(model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"transformer", "transformer_no_decay", "backbone", "backbone_no_decay"}
    for name, group in groups.items():
        assert all(p.dim() <= 1 for p in group["params"]) == name.endswith("no_decay")
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else config.weight_decay)
        assert group["lr"] == (config.lr_backbone if name.startswith("backbone") else config.lr)
    optimised = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(optimised) == len({id(p) for p in optimised}) == len(trainable)
    assert group_learning_rate(optimizer, ("backbone",)) == 3e-5
    assert group_learning_rate(optimizer, ("nothing",)) is None


def test_split_checks_names_and_type():
    with pytest.raises(ValueError, match="names"):
        split_decay_groups([{"params": [torch.nn.Parameter(torch.randn(2))], "weight_decay": 0.1}], [])
    with pytest.raises(TypeError, match="model"):
        build_optimizer(torch.nn.Linear(2, 2))


def test_the_fused_optimizer_on_the_cpu_matches_a_float64_adamw():
    config = get_preset("tiny", d_model=32, num_heads=2, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                        num_queries=3, vocab_size=50, num_classes=4, num_attributes=3)
    torch.manual_seed(0)
    model = E2EVLP(config)
    optimizer = build_optimizer(model)
    assert all(group["fused"] for group in optimizer.param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    reference = [p.detach().double().clone().requires_grad_(True) for p in params]
    reference_groups = []
    start = 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        reference_groups.append({"params": reference[start:start + count], "lr": group["lr"],
                                 "weight_decay": group["weight_decay"]})
        start += count
    reference_optimizer = torch.optim.AdamW(reference_groups, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, grad in zip(params, reference, grads):
            p.grad, q.grad = grad, grad.double()
        optimizer.step()
        reference_optimizer.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=1e-5, atol=1e-6)
