"""Decoding over fixed-size caches (fastvlp.models.static_caption_cache) against the growing cache, and
caption generation through it; the CUDA graph that replays its step is checked on CUDA only."""
import pytest
import torch

from fastvlp.models import generation
from fastvlp.models.caption_cache import IncrementalCaptionDecoder
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.models.static_caption_cache import CapturedCaptionDecoder, StaticCaptionDecoder

BOS, EOS, PAD = 2, 3, 0


def _model(device="cpu", dtype=torch.float64):
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=50, num_classes=5, num_attributes=0, max_text_len=12)
    return E2EVLP(config).to(device=device, dtype=dtype).eval()


def _encoded(model, batch=3, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 64, 96, generator=generator).to(device=device, dtype=model.query_embed.weight.dtype)
    pixel_mask = torch.zeros(batch, 64, 96, dtype=torch.bool)
    pixel_mask[0, :, 64:] = True  # one image padded on the right: its padded tokens must stay masked
    return model.encode_image_only(images, pixel_mask.to(device))


@pytest.mark.parametrize("max_length", [1, 5, 12])
def test_static_steps_give_the_growing_caches_logits_through_reorders(max_length):
    model = _model()
    with torch.no_grad():
        encoded = _encoded(model)
        growing, static = IncrementalCaptionDecoder(model, encoded), StaticCaptionDecoder(model, encoded, max_length)
        generator = torch.Generator().manual_seed(2)
        tokens = torch.full((3,), BOS, dtype=torch.int64)
        for step in range(max_length):
            expected, got = growing.step(tokens), static.step(tokens)
            assert got.dtype == expected.dtype and got.shape == (3, 50)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
            assert static.length == growing.length == step + 1 and int(static.position) == step + 1
            rows = torch.randint(0, 3, (3,), generator=generator)  # beams may be copied, dropped or swapped
            growing.reorder(rows)
            static.reorder(rows)
            tokens = torch.randint(5, 50, (3,), generator=generator)


def test_the_caches_run_out_and_bad_arguments_are_named():
    model = _model()
    with torch.no_grad():
        encoded = _encoded(model)
        static = StaticCaptionDecoder(model, encoded, 2)
        tokens = torch.full((3,), BOS, dtype=torch.int64)
        static.step(tokens)
        static.step(tokens)
        with pytest.raises(ValueError, match="token_ids: the caches hold 2 positions"):
            static.step(tokens)
        static.rewind()
        assert static.length == 0 and int(static.position) == 0
        # After a rewind, the first step is that of a fresh decoder: later positions stay masked.
        torch.testing.assert_close(static.step(tokens), IncrementalCaptionDecoder(model, encoded).step(tokens))
        for bad in (0, 13, True):
            with pytest.raises(ValueError, match="max_length"):
                StaticCaptionDecoder(model, encoded, bad)
        with pytest.raises(ValueError, match="rows"):
            static.reorder(torch.zeros(2, dtype=torch.int64))
        with pytest.raises(ValueError, match="decoder: a CUDA graph needs a decoder on a CUDA device"):
            CapturedCaptionDecoder(StaticCaptionDecoder(model, encoded, 2))
        with pytest.raises(TypeError, match="decoder"):
            CapturedCaptionDecoder(IncrementalCaptionDecoder(model, encoded))


def test_cuda_graph_generation_refuses_the_cpu_and_the_uncached_path():
    model = _model()
    with torch.no_grad():
        encoded = _encoded(model)
    common = dict(encoded=encoded, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4, num_beams=2)
    with pytest.raises(ValueError, match="cuda_graph: a CUDA graph needs the model on a CUDA device"):
        generation.generate_captions(model, None, None, cuda_graph=True, **common)
    with pytest.raises(ValueError, match="cuda_graph: the captured step decodes with the cache"):
        generation.generate_captions(model, None, None, cuda_graph=True, use_cache=False, **common)
    with pytest.raises(TypeError, match="cuda_graph"):
        generation.generate_captions(model, None, None, cuda_graph=1, **common)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_over_the_fixed_size_caches_gives_the_same_captions(monkeypatch, num_beams):
    # The graph's stand-in on the CPU: the same static decoder, its steps run eagerly.
    monkeypatch.setattr(generation, "graph_decoder", lambda model, encoded, max_length: StaticCaptionDecoder(
        model, encoded, max_length))
    model = _model(dtype=torch.float32)
    with torch.no_grad():
        encoded = _encoded(model)
    common = dict(encoded=encoded, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=8, num_beams=num_beams,
                  return_scores=True)
    expected = generation.generate_captions(model, None, None, **common)
    got = generation.generate_captions(model, None, None, cuda_graph=True, **common)
    assert got[0] == expected[0]
    assert got[1] == pytest.approx(expected[1], rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("num_beams", [1, 4])
def test_captured_generation_gives_the_cached_captions_on_cuda(num_beams):
    model = _model("cuda", torch.float32)
    with torch.no_grad():
        encoded = _encoded(model, batch=5, device="cuda")
    common = dict(encoded=encoded, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=10, num_beams=num_beams)
    expected = generation.generate_captions(model, None, None, **common)
    assert generation.generate_captions(model, None, None, cuda_graph=True, **common) == expected


@pytest.mark.cuda
def test_replays_follow_the_eager_steps_on_cuda():
    model = _model("cuda", torch.float32)
    with torch.no_grad():
        encoded = _encoded(model, device="cuda")
        eager, captured = IncrementalCaptionDecoder(model, encoded), CapturedCaptionDecoder(
            StaticCaptionDecoder(model, encoded, 6))
        tokens = torch.full((3,), BOS, dtype=torch.int64, device="cuda")
        for step in range(6):
            torch.testing.assert_close(captured.step(tokens), eager.step(tokens), rtol=1e-4, atol=1e-4)
            assert captured.length == step + 1
            rows = torch.tensor([2, 0, 0], device="cuda")
            eager.reorder(rows)
            captured.reorder(rows)
            tokens = torch.tensor([7, 8, 9], device="cuda") + step
        with pytest.raises(ValueError, match="token_ids: the caches hold 6 positions"):
            captured.step(tokens)
