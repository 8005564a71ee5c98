"""The visual backbone: a torchvision ResNet's C5 (or C4, or dilated C5) map, a 1x1 projection to ``d_model``
and the pixel mask downsampled with it, flattened into image tokens with their 2-D sine position encodings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, ResNet

from fastvlp.nn.frozen_batch_norm import FrozenBatchNorm2d
from fastvlp.nn.position_encoding import PositionEmbeddingSine

RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Modules frozen by `frozen_stages = k`: the stem and layer1 .. layer<k> (k = 0: none).
_STAGES = (("conv1", "bn1", "layer1"), ("layer2",), ("layer3",), ("layer4",))
# The feature map the tokens come from: C5 (layer4, stride 32) as in the paper; C4 (layer3, stride 16), which
# gives small images four times the tokens; or DETR's DC5, layer4 run at stride 16 with dilated convolutions,
# which gives the same four times the tokens and keeps every weight of the C5 backbone.
OUTPUTS = {"c5": "layer4", "c4": "layer3", "dc5": "layer4"}
_STAGE_COUNT = {"c5": 4, "c4": 3, "dc5": 4}


def dilate_last_stage(resnet: ResNet) -> None:
    """Run ``layer4`` at stride 16 instead of 32, as torchvision's ``replace_stride_with_dilation=[False,
    False, True]`` builds it, for basic blocks too (which torchvision refuses to dilate): the first block's
    strided convolution and shortcut take stride 1, and every 3x3 convolution after them dilation 2, so
    that each sees as far as it did. The weights keep their shapes, so C5 checkpoints load unchanged."""
    for index, block in enumerate(resnet.layer4):
        for conv in (module for module in block.modules() if isinstance(module, nn.Conv2d)):
            if index == 0 and conv.stride == (2, 2):
                conv.stride = (1, 1)
            elif index > 0 and conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (2, 2), (2, 2)


def convolution_layout(device: torch.device) -> torch.memory_format:
    """The memory format a ResNet runs in on ``device``: channels-last on CUDA, where cuDNN's tensor-core
    convolutions work in NHWC and an NCHW tensor costs a transpose into and out of each one; the default
    layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


@dataclass
class VisualTokens:
    """Image tokens, batch-first: ``features`` ``[B, HW, d]``, ``padding_mask`` bool ``[B, HW]`` (True =
    padding), ``pos`` ``[B, HW, d]`` (float32), and the feature map's ``(H, W)``."""

    features: Tensor
    padding_mask: Tensor
    pos: Tensor
    spatial_shape: tuple


def read_state_dict(path: Union[str, Path]) -> Dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file, or from any other file through ``torch.load`` with
    ``weights_only=True``. Raises ``ValueError`` naming the file when it is neither."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source: no such backbone weight file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each reader raises its own types (UnpicklingError, KeyError, SafetensorError, ...)
        lines = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch.save file (weights only)"
        raise ValueError(f"source: expected {kind} holding a state dict, {path} is not one ({detail})") from None
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise ValueError(f"source: expected a state dict (parameter name -> tensor), {path} holds a "
                         f"{type(state).__name__}")
    return dict(state)


def _few(keys: list) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"


def check_images(images: Tensor, pixel_mask: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor [B, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not isinstance(pixel_mask, Tensor) or pixel_mask.dtype != torch.bool:
        raise ValueError("pixel_mask: expected a bool tensor [B, H, W] (True = padding)")
    if pixel_mask.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"pixel_mask: expected shape {[images.shape[0], *images.shape[2:]]}, got {list(pixel_mask.shape)}")


class Backbone(nn.Module):
    """ResNet body up to ``layer4`` (C5, stride 32; ``output="c4"``: up to ``layer3``, stride 16;
    ``output="dc5"``: up to ``layer4`` run at stride 16 by :func:`dilate_last_stage`), a 1x1 convolution
    to ``d_model``, the sine encoding.

    Padded pixels are zeroed before the ResNet, so what a batch's padding holds never reaches the
    features (its extent does, through the convolutions' receptive fields, as in DETR). The weights
    start random; :meth:`load_backbone_weights` reads a torchvision ResNet checkpoint from a path.
    """

    def __init__(self, name: str = "resnet50", d_model: int = 256, frozen_batch_norm: bool = True, frozen_stages: int = 0,
                 output: str = "c5"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {tuple(OUTPUTS)}, got {output!r}")
        if name not in RESNETS:
            raise ValueError(f"name: expected one of {RESNETS}, got {name!r}")
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= len(_STAGES):
            raise ValueError(f"frozen_stages: expected an int in 0..{len(_STAGES)} (0: none; k: the stem and layer1..layer<k>), got {frozen_stages!r}")
        norm_layer = FrozenBatchNorm2d if frozen_batch_norm else nn.BatchNorm2d
        if name == "resnet10":
            # torchvision's ResNet with one basic block a stage: ResNet-18's layout at half its depth, for
            # the tiny preset, which trains from random weights on 2 CPU cores.
            resnet = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
        else:
            resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if output == "dc5":
            dilate_last_stage(resnet)
        # C4 (layer3, stride 16) has half of C5's channels in every torchvision ResNet.
        self.num_channels = resnet.fc.in_features if output != "c4" else resnet.fc.in_features // 2
        if frozen_stages > _STAGE_COUNT[output]:
            raise ValueError(f"frozen_stages: output {output} keeps {_STAGE_COUNT[output]} stages, got {frozen_stages}")
        self.body = IntermediateLayerGetter(resnet, return_layers={OUTPUTS[output]: output})
        self.dropped_modules = {name for name, _ in resnet.named_children()} - set(dict(self.body.named_children()))
        self.input_proj = nn.Conv2d(self.num_channels, d_model, kernel_size=1)
        self.position_encoding = PositionEmbeddingSine(d_model // 2, normalize=True)
        self.name, self.frozen_stages, self.output = name, frozen_stages, output
        # The ResNet's memory format; None: `convolution_layout` of the input's device.
        self.layout: Optional[torch.memory_format] = None
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        for stage in _STAGES[: self.frozen_stages]:
            for module_name in stage:
                for parameter in getattr(self.body, module_name).parameters():
                    parameter.requires_grad_(False)

    def load_backbone_weights(self, source: Union[str, Path, Mapping[str, Tensor]]) -> None:
        """Load a torchvision ResNet state dict (the ``fc`` classifier is ignored) from a ``.pth``/``.pt``
        file, a ``.safetensors`` file, or a mapping. Raises ``ValueError`` when a file is not a state dict, or
        naming missing, unexpected or wrongly shaped keys."""
        self.body.load_state_dict(self.checked_backbone_weights(source), strict=True)

    def checked_backbone_weights(self, source: Union[str, Path, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
        """The part of ``source`` (as :meth:`load_backbone_weights` takes it) that this body loads, checked
        without loading it, so that a backbone built on the ``meta`` device can vet a weight file cheaply."""
        if isinstance(source, (str, Path)):
            state = read_state_dict(source)
            where = f"{Path(source)} is"
        elif isinstance(source, Mapping):
            state, where = source, "the mapping is"
        else:
            raise TypeError(f"source: expected a path or a state dict, got {type(source).__name__}")
        # The classifier, and for a C4 backbone layer4, have no place in the body.
        state = {key: value for key, value in state.items() if key.split(".")[0] not in self.dropped_modules}
        # FrozenBatchNorm2d has no num_batches_tracked buffer; torchvision checkpoints do.
        expected = self.body.state_dict()
        state = {key: value for key, value in state.items() if key in expected or not key.endswith("num_batches_tracked")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        # Same keys, other widths (e.g. a wide ResNet): load_state_dict would fail with a RuntimeError.
        reshaped = sorted(key for key in set(state) & set(expected)
                          if not isinstance(state[key], Tensor) or state[key].shape != expected[key].shape)
        if missing or unexpected or reshaped:
            raise ValueError(
                f"source: expected a {self.name} state dict, {where} not one (missing {_few(missing)}, "
                f"unexpected {_few(unexpected)}, other shapes {_few(reshaped)})"
            )
        return state

    def forward(self, images: Tensor, pixel_mask: Tensor) -> VisualTokens:
        """``images`` ``[B, 3, H, W]``, ``pixel_mask`` bool ``[B, H, W]`` (True = padding) -> :class:`VisualTokens`."""
        check_images(images, pixel_mask)
        images = images.masked_fill(pixel_mask[:, None], 0.0)
        layout = convolution_layout(images.device) if self.layout is None else self.layout
        images = images.contiguous(memory_format=layout)
        feature_map = self.input_proj(self.body(images)[self.output])
        height, width = feature_map.shape[-2:]
        mask = F.interpolate(pixel_mask[:, None].float(), size=(height, width), mode="nearest")[:, 0].to(torch.bool)
        pos = self.position_encoding(mask)
        return VisualTokens(
            features=feature_map.flatten(2).transpose(1, 2),  # contiguous already from a channels-last map
            padding_mask=mask.flatten(1),
            pos=pos.flatten(2).transpose(1, 2),
            spatial_shape=(height, width),
        )
