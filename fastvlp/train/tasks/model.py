"""The fine-tuning model: the pre-trained E2E-VLP (under ``vlp.``) plus a task head (under ``head.``),
with the E2E-VLP parts the task never runs removed, so that they neither train nor load."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP

# E2EVLP's parts by role; a task keeps what it runs.
ENCODER_PARTS = ("backbone", "text_embeddings", "encoder")
ALL_PARTS = ENCODER_PARTS + ("decoder", "query_embed", "query_anchors", "mlm_head", "itm_head", "detection_heads",
                             "token_detection_head", "caption_head", "contrastive_head")


class TaskModel(nn.Module):
    """Base of the five task models. Subclasses set ``task_name`` and ``kept_parts``, build ``self.head``
    and implement ``forward(batch) -> TaskOutput``. ``task_state`` is what ``task.json`` stores beyond
    the task name (answer vocabulary, category map, ...)."""

    task_name = ""
    kept_parts = ENCODER_PARTS
    fresh_parts: Tuple[str, ...] = ()  # E2EVLP parts the task re-initialises: never taken from pre-training

    def __init__(self, config: E2EVLPConfig, task_state: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        if not isinstance(config, E2EVLPConfig):
            raise TypeError(f"config: expected an E2EVLPConfig, got {type(config).__name__}")
        self.vlp = E2EVLP(config)
        for part in ALL_PARTS:
            if part not in self.kept_parts:
                setattr(self.vlp, part, None)
        self.task_state: Dict[str, Any] = dict(task_state or {})

    @property
    def config(self) -> E2EVLPConfig:
        return self.vlp.config

    def backend_report(self) -> Dict[str, object]:
        return self.vlp.backend_report()

    def clear_attention_paths(self) -> None:
        for module in (self.vlp.encoder, self.vlp.decoder):
            if module is not None:
                for layer in module.layers:
                    layer.attention_paths.clear()

    def parameter_groups(self) -> List[Dict[str, object]]:
        """AdamW groups: the trainable backbone parameters at ``config.lr_backbone``, every other trainable
        parameter (Transformer and head) at ``config.lr``, all with ``config.weight_decay``."""
        backbone_ids = {id(p) for p in self.vlp.backbone.body.parameters()}
        main, backbone = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (backbone if id(parameter) in backbone_ids else main).append(parameter)
        config = self.config
        groups = [{"params": main, "lr": config.lr, "weight_decay": config.weight_decay}]
        if backbone:
            groups.append({"params": backbone, "lr": config.lr_backbone, "weight_decay": config.weight_decay})
        return groups
