"""The ResNet backbone: stride-32 tokens, the downsampled mask, padding, frozen BN, local weights."""
import pytest
import torch
import torchvision
from safetensors import torch as safetensors_torch
from torchvision.ops import FrozenBatchNorm2d

from fastvlp.models.backbone import Backbone


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Backbone("resnet18", d_model=16, frozen_batch_norm=True).eval()


def test_tokens_mask_and_positions(backbone):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 160, generator=generator)
    pixel_mask = torch.zeros(2, 96, 160, dtype=torch.bool)
    pixel_mask[1, 50:, :] = True
    pixel_mask[1, :, 90:] = True
    tokens = backbone(images, pixel_mask)
    assert tokens.spatial_shape == (3, 5)
    assert tokens.features.shape == (2, 15, 16) and tokens.pos.shape == (2, 15, 16)
    # Nearest downsampling by 32 reads pixel (32 i, 32 j).
    expected_mask = pixel_mask[:, ::32, ::32]
    assert torch.equal(tokens.padding_mask, expected_mask.flatten(1))
    assert tokens.padding_mask[1].sum() == 15 - 2 * 3  # rows 0-1 and columns 0-2 of image 1 are valid
    expected_pos = backbone.position_encoding(expected_mask).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.pos, expected_pos)
    # The features are the 1x1 projection of the ResNet's C5 map.
    c5 = backbone.body(images.masked_fill(pixel_mask[:, None], 0))["c5"]
    torch.testing.assert_close(tokens.features, backbone.input_proj(c5).flatten(2).transpose(1, 2))


def test_padded_pixels_never_reach_the_features(backbone):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    pixel_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    pixel_mask[0, :, 60:] = True
    noisy = torch.where(pixel_mask[:, None], torch.randn(images.shape, generator=generator) * 100, images)
    torch.testing.assert_close(backbone(noisy, pixel_mask).features, backbone(images, pixel_mask).features)


def test_batch_norm_kinds_and_frozen_stages():
    frozen = Backbone("resnet18", 8, frozen_batch_norm=True, frozen_stages=2)
    assert isinstance(frozen.body.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for name, p in frozen.body.named_parameters() if name.startswith(("conv1", "layer1", "layer2")))
    assert all(p.requires_grad for name, p in frozen.body.named_parameters() if name.startswith(("layer3", "layer4")))
    trainable = Backbone("resnet18", 8, frozen_batch_norm=False)
    assert isinstance(trainable.body.bn1, torch.nn.BatchNorm2d) and all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError, match="name"):
        Backbone("vgg16")
    with pytest.raises(ValueError, match="frozen_stages"):
        Backbone("resnet18", frozen_stages=5)


@pytest.mark.parametrize("frozen_batch_norm", [True, False])
def test_loads_torchvision_weights_from_a_path(tmp_path, frozen_batch_norm):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # distinctive batch-norm statistics, so that a skipped buffer shows
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = Backbone("resnet18", 8, frozen_batch_norm=frozen_batch_norm)
    backbone.load_backbone_weights(path)
    loaded = backbone.body.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("fc.") or (frozen_batch_norm and key.endswith("num_batches_tracked")):
            continue
        assert torch.equal(loaded[key], value), key
    # The body computes what torchvision's ResNet computes before its pooling.
    source.eval()
    backbone.eval()
    image = torch.randn(1, 3, 64, 64)
    expected = torch.nn.Sequential(*list(source.children())[:-2])(image)
    torch.testing.assert_close(backbone.body(image)["c5"], expected, rtol=1e-4, atol=1e-5)


def test_rejects_weights_of_another_network(tmp_path):
    backbone = Backbone("resnet18", 8)
    with pytest.raises(ValueError, match=r"^source: expected a resnet18 state dict, the mapping is not one \(missing"):
        backbone.load_backbone_weights({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(FileNotFoundError):
        backbone.load_backbone_weights(tmp_path / "absent.pth")
    # the same keys with other shapes are named too, not left to load_state_dict's RuntimeError
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(ValueError, match=r"other shapes \['layer1.0.conv1.weight'\]"):
        backbone.load_backbone_weights(state)


def test_rejects_files_that_are_not_state_dicts(tmp_path):
    backbone = Backbone("resnet10", 8)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"^source: expected a torch.save file \(weights only\) holding a state dict, "
                                         r".*garbage.pth is not one \("):
        backbone.load_backbone_weights(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"^source: expected a safetensors file holding a state dict, "
                                         r".*garbage.safetensors is not one \(SafetensorError"):
        backbone.load_backbone_weights(tmp_path / "garbage.safetensors")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"^source: expected a state dict \(parameter name -> tensor\), .* holds a list"):
        backbone.load_backbone_weights(tmp_path / "list.pth")


def test_a_meta_backbone_checks_a_weight_file_without_loading_it(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    safetensors_torch.save_file(source.state_dict(), str(tmp_path / "resnet18.safetensors"))
    with torch.device("meta"):
        meta = Backbone("resnet18", 8)
    checked = meta.checked_backbone_weights(tmp_path / "resnet18.safetensors")
    assert "fc.weight" not in checked and torch.equal(checked["conv1.weight"], source.conv1.weight)
    assert meta.body.conv1.weight.is_meta
    with torch.device("meta"):
        other = Backbone("resnet34", 8)
    with pytest.raises(ValueError, match=r"^source: expected a resnet34 state dict, .*resnet18.safetensors is not one"):
        other.checked_backbone_weights(tmp_path / "resnet18.safetensors")


def test_resnet10_is_torchvision_resnet_with_one_block_a_stage():
    backbone = Backbone("resnet10", 8, frozen_batch_norm=False)
    body = backbone.body
    assert [len(getattr(body, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert backbone.num_channels == 512
    torch.manual_seed(0)
    images = torch.randn(2, 3, 70, 90)
    mask = torch.zeros(2, 70, 90, dtype=torch.bool)
    mask[1, :, 60:] = True
    tokens = backbone(images, mask)
    assert tokens.spatial_shape == (3, 3) and tokens.features.shape == (2, 9, 8)
    assert tokens.padding_mask[1].any() and not tokens.padding_mask[0].any()


def test_c4_output_has_stride_16_and_layer3_channels():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[0, 40:] = True
    c4 = Backbone("resnet10", 8, frozen_batch_norm=False, output="c4")
    assert c4.num_channels == 256 and not hasattr(c4.body, "layer4")
    tokens = c4(images, mask)
    assert tokens.spatial_shape == (4, 6) and tokens.features.shape == (2, 24, 8)
    # the padding mask is the pixel mask downsampled to the stride-16 grid: rows 40.. of 64 -> rows 3.. of 4
    assert tokens.padding_mask[0].view(4, 6)[3:].all() and not tokens.padding_mask[0].view(4, 6)[:2].any()
    assert not tokens.padding_mask[1].any()
    assert Backbone("resnet50", 8, output="c4").num_channels == 1024


def test_c4_backbone_loads_a_full_resnet_state_dict_without_layer4():
    source = torchvision.models.resnet18(weights=None)
    backbone = Backbone("resnet18", 8, frozen_batch_norm=False, output="c4")
    backbone.load_backbone_weights(source.state_dict())
    assert torch.equal(backbone.body.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(ValueError, match="frozen_stages"):
        Backbone("resnet18", 8, output="c4", frozen_stages=4)
    with pytest.raises(ValueError, match="output"):
        Backbone("resnet18", 8, output="c3")


def test_dc5_matches_torchvisions_dilated_resnet50_with_the_same_weights():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    backbone = Backbone("resnet50", 8, output="dc5").eval()
    backbone.load_backbone_weights(reference.state_dict())
    images = torch.randn(1, 3, 80, 112, dtype=torch.float64)
    body = torch.nn.Sequential(*list(reference.children())[:-2]).double()
    expected = body(images)
    got = backbone.body.double()(images)["dc5"]
    assert got.shape == expected.shape == (1, 2048, 5, 7)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_dc5_runs_basic_blocks_at_stride_16_and_loads_c5_weights():
    torch.manual_seed(0)
    c5 = Backbone("resnet18", 8, frozen_batch_norm=False)
    dc5 = Backbone("resnet18", 8, frozen_batch_norm=False, output="dc5")
    assert dc5.num_channels == c5.num_channels == 512
    dc5.load_state_dict(c5.state_dict())  # same keys, same shapes
    first, second = dc5.body.layer4
    assert first.conv1.stride == (1, 1) and first.downsample[0].stride == (1, 1) and first.conv2.dilation == (1, 1)
    assert second.conv1.dilation == second.conv2.dilation == (2, 2) and second.conv1.padding == (2, 2)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 80:] = True
    tokens = dc5(images, mask)
    assert tokens.spatial_shape == (4, 6) and c5(images, mask).spatial_shape == (2, 3)
    assert tokens.padding_mask[1].view(4, 6)[:, 5].all() and not tokens.padding_mask[0].any()
    # stride 16 by dilation, not by dropping layer4: layer3 is unchanged, layer4's output differs from C5's
    assert dc5.body.layer3[0].conv1.stride == (2, 2)
    assert Backbone("resnet10", 8, frozen_batch_norm=False, output="dc5")(images, mask).spatial_shape == (4, 6)
