"""AdamW over E2E-VLP's parameter groups, with no weight decay on norms and biases."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

TRANSFORMER_GROUPS = ("transformer", "transformer_no_decay")
BACKBONE_GROUPS = ("backbone", "backbone_no_decay")
FUSED_DEVICES = ("cpu", "cuda")


def split_decay_groups(groups: List[Dict[str, object]], names: List[str]) -> List[Dict[str, object]]:
    """Each group split in two: weights (matrices, convolutions, embeddings) keep the group's weight decay,
    one-dimensional parameters (norm scales and shifts, biases) get none. ``names[i]`` names group ``i``;
    the halves are named ``name`` and ``name + "_no_decay"``. Empty halves are left out."""
    if len(groups) != len(names):
        raise ValueError(f"names: expected {len(groups)} names, got {len(names)}")
    result = []
    for group, name in zip(groups, names):
        params = list(group["params"])
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        for suffix, chosen, weight_decay in (("", decay, group["weight_decay"]), ("_no_decay", no_decay, 0.0)):
            if chosen:
                result.append({**group, "params": chosen, "weight_decay": weight_decay, "name": name + suffix})
    return result


def build_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW over ``model.parameter_groups()`` (Transformer and heads at ``config.lr``, the backbone at
    ``config.lr_backbone``), weight decay ``config.weight_decay`` except on norms and biases. The fused
    implementation where every parameter is on a CPU or CUDA device: on a tiny model's CPU step the
    per-parameter loop of the default one takes about six times as long (several per cent of the step)."""
    if not hasattr(model, "parameter_groups"):
        raise TypeError(f"model: expected an E2EVLP (with parameter_groups()), got {type(model).__name__}")
    groups = model.parameter_groups()
    names = ["transformer", "backbone"][: len(groups)]
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(split_decay_groups(groups, names), fused=fused or None)


def group_learning_rate(optimizer: torch.optim.Optimizer, names) -> float | None:
    """The current learning rate of the first group named in ``names`` (None when there is none)."""
    for group in optimizer.param_groups:
        if group.get("name") in names:
            return float(group["lr"])
    return None
