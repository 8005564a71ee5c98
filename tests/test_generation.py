"""Caption generation: the key/value cache against full decoding, greedy and beam search, exhaustive search."""
import itertools
import math

import pytest
import torch

from fastvlp.models import E2EVLP, E2EVLPConfig
from fastvlp.models.caption_cache import IncrementalCaptionDecoder
from fastvlp.models.generation import generate_captions, gnmt_length_penalty
from fastvlp.models.outputs import EncoderOutput

PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab_size=12, max_text_len=8, seed=0, eos_bias=1.5, backend="fastvlp"):
    torch.manual_seed(seed)
    config = E2EVLPConfig(
        backbone="resnet18", frozen_batch_norm=False, backbone_frozen_stages=0, d_model=16, num_heads=2, ffn_dim=24,
        num_encoder_layers=1, num_decoder_layers=2, num_queries=4, vocab_size=vocab_size, max_text_len=max_text_len,
        num_classes=3, num_attributes=0, dropout=0.0, attention_backend=backend,
    )
    model = E2EVLP(config).double().eval()
    with torch.no_grad():
        # Peakier, image-dependent distributions (random init is nearly uniform), and an end token that
        # wins sometimes, so both the finished and the live paths of the search run.
        model.text_embeddings.word_embeddings.weight.normal_(0, 1.0)
        model.caption_head.bias.normal_(0, 1.0)
        model.caption_head.bias[EOS] += eos_bias
    return model


def images(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 64, 64, generator=generator, dtype=torch.float64)
    mask = torch.zeros(batch, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True  # padded image: its memory has masked keys
    return pixels.masked_fill(mask[:, None], 0.0), mask


def random_memory(batch=3, length=6, seed=5, scale=3.0):
    """An image-only encoder output drawn at random (a random-weight encoder gives nearly the same memory for
    every image, so every caption would be the same); row 1 has padded memory positions."""
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, length, 16, generator=generator, dtype=torch.float64) * scale
    pos = torch.randn(batch, length, 16, generator=generator, dtype=torch.float64)
    padding_mask = torch.zeros(batch, length, dtype=torch.bool)
    padding_mask[1, 4:] = True
    return EncoderOutput(memory, padding_mask, pos, 0, (2, 3))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2, eos_bias=1.0)


@pytest.fixture(scope="module")
def encoded():
    return random_memory()


def test_cached_step_logits_match_full_decoding(model, encoded):
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, model.config.vocab_size, (3, 7), generator=generator)
    tokens[:, 0] = BOS
    with torch.no_grad():
        full = model.caption_logits(encoded, tokens)
        cache = IncrementalCaptionDecoder(model, encoded)
        steps = torch.stack([cache.step(tokens[:, t]) for t in range(tokens.shape[1])], 1)
    assert steps.dtype == torch.float64
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-10)


def test_cache_reorder_follows_rows(model, encoded):
    # Rows of one image share a memory: decode 2 copies of image 0, swap their prefixes mid-way.
    pair = encoded.select(torch.tensor([0, 0]))
    first, second = torch.tensor([BOS, 5, 7, 4]), torch.tensor([BOS, 9, 3, 8])
    with torch.no_grad():
        cache = IncrementalCaptionDecoder(model, pair)
        for t in range(2):
            cache.step(torch.stack((first[t], second[t])))
        cache.reorder(torch.tensor([1, 0]))
        swapped = torch.stack([cache.step(torch.stack((second[t], first[t]))) for t in (2, 3)], 1)
        full = model.caption_logits(pair, torch.stack((second, first)))[:, 2:]
    torch.testing.assert_close(swapped, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_generation_agree(model, encoded, num_beams):
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=7, num_beams=num_beams, encoded=encoded, return_scores=True)
    cached, cached_scores = generate_captions(model, None, None, use_cache=True, **common)
    plain, plain_scores = generate_captions(model, None, None, use_cache=False, **common)
    assert cached == plain
    assert cached_scores == pytest.approx(plain_scores, abs=1e-9)
    assert len(cached) == 3 and all(len(caption) <= 7 for caption in cached)
    assert all(token not in (BOS, PAD, EOS) for caption in cached for token in caption)


def reference_log_probs(model, encoded, row, prefix):
    """Float64 log-probabilities of the next token after ``[BOS] + prefix`` by a full decoder pass."""
    tokens = torch.tensor([[BOS] + list(prefix)])
    with torch.no_grad():
        logits = model.caption_logits(encoded.select(torch.tensor([row])), tokens)[0, -1]
    log_probs = torch.log_softmax(logits, -1)
    log_probs[[BOS, PAD]] = -math.inf
    return log_probs


def test_greedy_matches_full_decoding_reference(model, encoded):
    max_length = 6
    greedy, greedy_scores = generate_captions(
        model, None, None, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=max_length, num_beams=1, encoded=encoded,
        return_scores=True,
    )
    for row in range(3):
        prefix, total = [], 0.0
        for _ in range(max_length):
            log_probs = reference_log_probs(model, encoded, row, prefix)
            token = int(log_probs.argmax())
            total += float(log_probs[token])
            if token == EOS:
                break
            prefix.append(token)
        assert greedy[row] == prefix
        assert greedy_scores[row] == pytest.approx(total, abs=1e-9)
    # Some rows end early and some run to max_length: both ways out of the loop are covered.
    assert {len(caption) == max_length for caption in greedy} == {True, False}


def test_beam_search_with_one_beam_is_greedy(model, encoded):
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=6, encoded=encoded)
    assert generate_captions(model, None, None, num_beams=1, **common) == generate_captions(
        model, None, None, **common, num_beams=1, use_cache=False
    )
    # The beam search code path with one beam: force it by calling the internal search directly.
    from fastvlp.models.generation import _beam_search

    beam_one, _ = _beam_search(model, encoded, BOS, EOS, 6, 1, 0.9, True, [PAD, BOS])
    assert beam_one == generate_captions(model, None, None, num_beams=1, **common)


@pytest.mark.parametrize("alpha", [0.9, 0.0, 2.0])
def test_wide_beam_finds_the_best_penalised_sequence(alpha):
    # Vocabulary {PAD, BOS, EOS, 3, 4}: every caption of at most 3 tokens is one of 1 + 2 + 4 + 8 = 15
    # sequences ([EOS], [a, EOS], [a, b, EOS], [a, b, c]); 12 beams keep all of them, so the search is exact.
    model = tiny_model(vocab_size=5, max_text_len=4, seed=3, eos_bias=0.5)
    encoded = random_memory(batch=2, seed=4)
    captions, scores = generate_captions(
        model, None, None, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=3, num_beams=12, length_penalty=alpha,
        encoded=encoded, return_scores=True,
    )
    for row in range(2):
        best_score, best = -math.inf, None
        for length in (1, 2, 3):
            for body in itertools.product((3, 4), repeat=length - 1):
                endings = [(EOS,)] + ([(3,), (4,)] if length == 3 else [])
                for ending in endings:
                    sequence = list(body) + list(ending)
                    total = sum(
                        float(reference_log_probs(model, encoded, row, sequence[:t])[sequence[t]]) for t in range(length)
                    )
                    score = total / ((5 + length) / 6) ** alpha
                    if score > best_score:
                        best_score, best = score, [t for t in sequence if t != EOS]
        assert captions[row] == best
        assert scores[row] == pytest.approx(best_score, abs=1e-9)


class _TableCaptioner(torch.nn.Module):
    """A hand-made captioner: the next-token distribution is a table keyed by the tokens after BOS, so the
    best caption is known. Vocabulary: PAD, BOS, EOS, A=3, B=4, C=5. A is the likelier first token, but
    every continuation of A is poor, while B is almost surely followed by EOS: greedy writes [A], the
    best caption is [B] (0.45 * 0.9 = 0.405 against 0.55 * 0.3 = 0.165 for [A])."""

    TABLE = {(): {3: 0.55, 4: 0.45}, (3,): {EOS: 0.3, 3: 0.25, 4: 0.25, 5: 0.2}, (4,): {EOS: 0.9, 3: 0.05, 5: 0.05}}
    OTHERWISE = {EOS: 0.9, 3: 0.04, 4: 0.03, 5: 0.03}

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=6, max_text_len=5)
        self.calls = 0

    def caption_logits(self, encoded, prefixes):
        self.calls += 1
        logits = torch.full((*prefixes.shape, 6), -1e9, dtype=torch.float64)
        for row, prefix in enumerate(prefixes.tolist()):
            for token, probability in self.TABLE.get(tuple(prefix[1:]), self.OTHERWISE).items():
                logits[row, -1, token] = math.log(probability)
        return logits


def test_beam_search_beats_greedy_on_a_hand_made_model_and_stops_when_its_beams_finish():
    encoded = EncoderOutput(torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, 16), 0, (1, 2))
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=5, encoded=encoded, use_cache=False,
                  return_scores=True)
    greedy, greedy_scores = generate_captions(_TableCaptioner(), None, None, num_beams=1, **common)
    assert greedy == [[3]] and greedy_scores[0] == pytest.approx(math.log(0.55 * 0.3), abs=1e-12)
    captioner = _TableCaptioner()
    beam, beam_scores = generate_captions(captioner, None, None, num_beams=2, **common)
    assert beam == [[4]]
    assert beam_scores[0] == pytest.approx(math.log(0.45 * 0.9) / gnmt_length_penalty(2, 0.9), abs=1e-12)
    # Both beams ended at step 2 ([B, EOS] and [A, EOS] rank first and second): no third step is taken.
    assert captioner.calls == 2
    wide, _ = generate_captions(_TableCaptioner(), None, None, num_beams=6, **common)
    assert wide == beam


def test_generation_from_images_restores_training_flag():
    model = tiny_model()
    model.train()
    pixels, mask = images(batch=2)
    captions = generate_captions(model, pixels, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4, num_beams=2)
    assert model.training
    with torch.no_grad():
        encoded = model.eval().encode_image_only(pixels, mask)
    assert captions == generate_captions(
        model, None, None, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=4, num_beams=2, encoded=encoded
    )


def test_length_penalty_values():
    assert gnmt_length_penalty(1, 0.9) == pytest.approx(1.0)
    assert gnmt_length_penalty(7, 0.9) == pytest.approx(2.0 ** 0.9)
    assert gnmt_length_penalty(13, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="length"):
        gnmt_length_penalty(-1, 0.9)


def test_invalid_arguments(model, encoded):
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, encoded=encoded, max_length=5)
    with pytest.raises(ValueError, match="max_length"):
        generate_captions(model, None, None, **dict(common, max_length=9))  # only 8 learned positions
    with pytest.raises(ValueError, match="num_beams"):
        generate_captions(model, None, None, **common, num_beams=0)
    with pytest.raises(ValueError, match="eos_id"):
        generate_captions(model, None, None, **dict(common, eos_id=PAD))
    with pytest.raises(ValueError, match="bos_id"):
        generate_captions(model, None, None, **dict(common, bos_id=99))
    with pytest.raises(TypeError, match="model"):
        generate_captions(object(), None, None, **common)
    with pytest.raises(TypeError, match="encoded"):
        generate_captions(model, None, None, **dict(common, encoded="memory"))
    # An image-text memory (model.encode) would let the caption read the text.
    with_text = EncoderOutput(encoded.memory, encoded.padding_mask, encoded.pos, 2, encoded.spatial_shape)
    with pytest.raises(ValueError, match="image-only"):
        generate_captions(model, None, None, **dict(common, encoded=with_text))


def test_torch_attention_backend_cache_agrees():
    model = tiny_model(seed=2, eos_bias=1.0, backend="torch")
    encoded = random_memory()
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=5, num_beams=2, encoded=encoded, return_scores=True)
    cached = generate_captions(model, None, None, use_cache=True, **common)
    plain = generate_captions(model, None, None, use_cache=False, **common)
    assert cached[0] == plain[0]
    assert cached[1] == pytest.approx(plain[1], abs=1e-9)
