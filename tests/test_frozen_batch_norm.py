"""Frozen batch norm that keeps its input's dtype, and the backbone's convolution layout."""
import pytest
import torch
import torchvision

from fastvlp.models.backbone import Backbone, convolution_layout
from fastvlp.nn.frozen_batch_norm import FrozenBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_statistics(module, seed: int):
    """``module`` with random affine parameters and running statistics (none of them the identity)."""
    generator = torch.Generator().manual_seed(seed)
    channels = module.weight.shape[0]
    with torch.no_grad():
        module.weight.copy_(torch.randn(channels, generator=generator))
        module.bias.copy_(torch.randn(channels, generator=generator))
        module.running_mean.copy_(torch.randn(channels, generator=generator))
        module.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.05)
    return module


def _reference(module, x: torch.Tensor) -> torch.Tensor:
    """The normalisation in float64."""
    shape = (1, -1, 1, 1)
    weight, bias, mean, var = (t.double().reshape(shape) for t in
                               (module.weight, module.bias, module.running_mean, module.running_var))
    return (x.double() - mean) / (var + module.eps).sqrt() * weight + bias


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_is_torchvision_bit_for_bit(memory_format):
    ours = _with_statistics(FrozenBatchNorm2d(6), seed=0)
    theirs = torchvision.ops.FrozenBatchNorm2d(6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=memory_format)
    out = ours(x)
    assert torch.equal(out, theirs(x))
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_inputs_stay_half_and_match_float64(dtype, tolerance):
    module = _with_statistics(FrozenBatchNorm2d(8), seed=2)
    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    out = module(x)
    assert out.dtype == dtype
    expected = _reference(module, x.detach())
    # Scale, shift and output are each rounded once to the input's precision.
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    out.backward(grad_out)
    assert x.grad.dtype == dtype
    scale = (module.weight.double() / (module.running_var.double() + module.eps).sqrt()).reshape(1, -1, 1, 1)
    expected_grad = grad_out.double() * scale
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=tolerance,
                               atol=tolerance * expected_grad.abs().max().item())


def test_empty_batch_and_torchvision_checkpoints():
    module = _with_statistics(FrozenBatchNorm2d(4), seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        out = module(torch.empty(0, 4, 3, 3, dtype=dtype))
        assert out.shape == (0, 4, 3, 3) and out.dtype == dtype
    # A trainable BatchNorm2d's state dict (with num_batches_tracked) loads as into torchvision's module.
    source = _with_statistics(torch.nn.BatchNorm2d(4), seed=6)
    target = FrozenBatchNorm2d(4)
    target.load_state_dict(source.state_dict())
    assert set(target.state_dict()) == set(torchvision.ops.FrozenBatchNorm2d(4).state_dict())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(target(x), source.eval()(x))


def test_backbone_under_bfloat16_autocast_keeps_bfloat16_between_convolutions():
    torch.manual_seed(8)
    backbone = Backbone("resnet18", d_model=16, frozen_batch_norm=True).eval()
    norms = [module for module in backbone.modules() if isinstance(module, torchvision.ops.FrozenBatchNorm2d)]
    assert norms and all(type(module) is FrozenBatchNorm2d for module in norms)
    seen = []
    handles = [module.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
               for module in norms]
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone(images, torch.zeros(1, 64, 64, dtype=torch.bool))
    for handle in handles:
        handle.remove()
    assert len(seen) == len(norms)
    assert all(pair == (torch.bfloat16, torch.bfloat16) for pair in seen), seen


def test_convolution_layout_by_device():
    assert convolution_layout(torch.device("cuda", 0)) is torch.channels_last
    assert convolution_layout(torch.device("cpu")) is torch.contiguous_format


def test_channels_last_gives_the_same_tokens():
    """The CUDA layout, run on the CPU: same tokens as the default layout, and contiguous features."""
    torch.manual_seed(10)
    backbone = Backbone("resnet18", d_model=16, frozen_batch_norm=True).eval()
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    pixel_mask[1, 70:, :] = True
    pixel_mask[1, :, 100:] = True
    with torch.no_grad():
        expected = backbone(images, pixel_mask)
        backbone.layout = torch.channels_last
        layer_outputs = []
        handle = backbone.body.layer1.register_forward_hook(lambda module, inputs, output: layer_outputs.append(output))
        tokens = backbone(images, pixel_mask)
        handle.remove()
    assert layer_outputs[0].is_contiguous(memory_format=torch.channels_last)
    assert tokens.features.is_contiguous()
    torch.testing.assert_close(tokens.features, expected.features, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens.padding_mask, expected.padding_mask)
    torch.testing.assert_close(tokens.pos, expected.pos)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backbone_on_cuda_runs_channels_last_in_bfloat16():
    torch.manual_seed(12)
    backbone = Backbone("resnet18", d_model=16, frozen_batch_norm=True).eval()
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(13))
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    pixel_mask[0, :, 90:] = True
    with torch.no_grad():
        expected = backbone(images, pixel_mask).features.double()
        backbone.cuda()
        seen = []
        handle = backbone.body.layer2.register_forward_hook(lambda module, inputs, output: seen.append(output))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens = backbone(images.cuda(), pixel_mask.cuda())
        handle.remove()
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert tokens.features.is_contiguous()
    scale = expected.abs().max().item()
    torch.testing.assert_close(tokens.features.double().cpu(), expected, rtol=5e-2, atol=5e-2 * scale)
