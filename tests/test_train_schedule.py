import pytest
import torch

from fastvlp.train.schedule import WarmupLinearDecay, build_scheduler, default_warmup_steps


def test_warmup_then_linear_decay_matches_the_formula():
    schedule = WarmupLinearDecay(4, 20)
    for step in range(21):
        expected = (step + 1) / 4 if step < 4 else (20 - step) / 16
        assert schedule(step) == pytest.approx(expected, abs=1e-15)
    assert schedule(20) == 0.0


def test_scheduler_drives_every_group_from_its_base_lr():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    bias = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-4}, {"params": [bias], "lr": 1e-5}])
    scheduler = build_scheduler(optimizer, 2, 6)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    factors = [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    for lrs, factor in zip(seen, factors):
        assert lrs == pytest.approx([1e-4 * factor, 1e-5 * factor], rel=1e-12)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupLinearDecay(30, 20)
    with pytest.raises(ValueError, match="max_steps"):
        WarmupLinearDecay(0, 0)
    assert default_warmup_steps(300) == 30 and default_warmup_steps(10**6) == 1000
