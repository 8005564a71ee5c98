"""Caption generation for E2E-VLP: greedy decoding and beam search with the GNMT length penalty.

The caption decoder reads the memory of an image-only encoder pass. Every sequence starts with
``bos_id`` at position 0; the positions continue one by one (``position_offset`` of the text
embeddings), so at most ``max_text_len`` positions are fed and ``max_length <= max_text_len``.
``bos_id`` and ``pad_id`` are never generated.

Beam search follows the usual rules: at each step the ``2 * num_beams`` best extensions of the live
beams are ranked by summed log-probability; an extension ending in ``eos_id`` that ranks among the first
``num_beams`` becomes a finished hypothesis, scored ``sum_log_prob / ((5 + length) / 6) ** alpha``
(Wu et al., 2016; ``length`` counts the generated tokens with the end token); the best ``num_beams``
other extensions stay live. An image is done once it has ``num_beams`` finished hypotheses; at
``max_length`` the top ``num_beams`` extensions are finished as they are. With ``num_beams=1`` this is
greedy decoding.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fastvlp.models.caption_cache import IncrementalCaptionDecoder
from fastvlp.models.outputs import EncoderOutput
from fastvlp.models.static_caption_cache import CapturedCaptionDecoder, StaticCaptionDecoder


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normaliser ``((5 + length) / 6) ** alpha``; a hypothesis scores ``log_prob / penalty``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected a non-negative int, got {length!r}")
    return ((5.0 + length) / 6.0) ** alpha


def graph_decoder(model: nn.Module, encoded: EncoderOutput, max_length: int) -> CapturedCaptionDecoder:
    """The decoder of ``generate_captions(..., cuda_graph=True)``: fixed-size caches, the step captured."""
    device = encoded.memory.device
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: a CUDA graph needs the model on a CUDA device, got {device}")
    return CapturedCaptionDecoder(StaticCaptionDecoder(model, encoded, max_length), warmup_steps=min(2, max_length))


class _StepLogProbs:
    """Log-probabilities of the next token for a growing batch of prefixes, with or without a cache."""

    def __init__(self, model: nn.Module, encoded: EncoderOutput, use_cache: bool, banned: List[int],
                 cuda_graph: bool = False, max_length: int = 0):
        self.model, self.encoded, self.banned = model, encoded, banned
        if cuda_graph:
            self.cache = graph_decoder(model, encoded, max_length)
        else:
            self.cache = IncrementalCaptionDecoder(model, encoded) if use_cache else None

    def __call__(self, prefixes: Tensor) -> Tensor:
        if self.cache is not None:
            logits = self.cache.step(prefixes[:, -1])
        else:
            logits = self.model.caption_logits(self.encoded, prefixes)[:, -1]
        log_probs = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        log_probs[:, self.banned] = -math.inf
        return log_probs

    def reorder(self, rows: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


def _check_token_id(name: str, value, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name}: expected an int in [0, {vocab_size}), got {value!r}")
    return value


def _check_arguments(model, bos_id, eos_id, pad_id, max_length, num_beams, length_penalty, use_cache, cuda_graph):
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "caption_logits"):
        raise TypeError(f"model: expected an E2EVLP model, got {type(model).__name__}")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        _check_token_id(name, value, config.vocab_size)
    if eos_id in (bos_id, pad_id):
        raise ValueError(f"eos_id: expected a token other than bos_id and pad_id, got {eos_id}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= config.max_text_len:
        raise ValueError(f"max_length: expected an int in [1, max_text_len={config.max_text_len}], got {max_length!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams: expected a positive int, got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite number, got {length_penalty!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache: expected bool, got {type(use_cache).__name__}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph: expected bool, got {type(cuda_graph).__name__}")
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph: the captured step decodes with the cache; pass use_cache=True")


def generate_captions(
    model: nn.Module,
    images: Optional[Tensor],
    pixel_mask: Optional[Tensor],
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
    num_beams: int = 4,
    length_penalty: float = 0.9,
    use_cache: bool = True,
    encoded: Optional[EncoderOutput] = None,
    return_scores: bool = False,
    cuda_graph: bool = False,
) -> Union[List[List[int]], Tuple[List[List[int]], List[float]]]:
    """Caption token ids for each image of ``images`` ``[B, 3, H, W]`` / ``pixel_mask`` ``[B, H, W]``.

    Returns one list per image of at most ``max_length`` generated ids, without ``bos_id`` and without
    the final ``eos_id``. ``num_beams=1`` decodes greedily; otherwise beam search (module docstring) with
    GNMT's length penalty exponent ``length_penalty``. ``use_cache`` decodes with per-layer key/value
    caches (same result, O(t) per step). ``cuda_graph`` (CUDA only, with the cache) decodes with caches of
    ``max_length`` positions allocated up front and replays each step from a CUDA graph captured once per
    call (:mod:`fastvlp.models.static_caption_cache`): the same captions, at a fraction of the host's launch
    time a step. ``encoded`` may replace the images (both None then) with a precomputed
    ``model.encode_image_only`` output. ``return_scores`` also returns each caption's score: its summed
    log-probability (greedy) or that sum divided by the length penalty (beam search).

    The model runs in evaluation mode without gradients; its training flag is restored afterwards.
    """
    _check_arguments(model, bos_id, eos_id, pad_id, max_length, num_beams, length_penalty, use_cache, cuda_graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if encoded is None:
                encoded = model.encode_image_only(images, pixel_mask)
            elif images is not None or pixel_mask is not None:
                raise ValueError("images, pixel_mask: expected None when encoded is given (it replaces them)")
            elif not isinstance(encoded, EncoderOutput):
                raise TypeError(f"encoded: expected an EncoderOutput, got {type(encoded).__name__}")
            elif encoded.text_length != 0:
                # A memory holding text would let the caption read it: captions decode over the image alone.
                raise ValueError(f"encoded: expected an image-only encoder output (model.encode_image_only), "
                                 f"got one with {encoded.text_length} text positions")
            banned = sorted({bos_id, pad_id})
            if num_beams == 1:
                captions, scores = _greedy(model, encoded, bos_id, eos_id, pad_id, max_length, use_cache, banned,
                                           cuda_graph)
            else:
                captions, scores = _beam_search(model, encoded, bos_id, eos_id, max_length, num_beams,
                                                float(length_penalty), use_cache, banned, cuda_graph)
    finally:
        model.train(was_training)
    return (captions, scores) if return_scores else captions


def _greedy(model, encoded, bos_id, eos_id, pad_id, max_length, use_cache, banned, cuda_graph=False):
    batch = encoded.memory.shape[0]
    device = encoded.memory.device
    step_log_probs = _StepLogProbs(model, encoded, use_cache, banned, cuda_graph, max_length)
    prefixes = torch.full((batch, 1), bos_id, dtype=torch.int64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    for _ in range(max_length):
        log_probs = step_log_probs(prefixes)
        best, tokens = log_probs.max(-1)
        scores += torch.where(finished, 0.0, best.double())
        tokens = tokens.masked_fill(finished, pad_id)
        prefixes = torch.cat((prefixes, tokens[:, None]), 1)
        finished |= tokens == eos_id
        if bool(finished.all()):
            break
    captions = []
    for row in prefixes[:, 1:].tolist():
        captions.append(row[: row.index(eos_id)] if eos_id in row else row)
    return captions, scores.tolist()


def _beam_search(model, encoded, bos_id, eos_id, max_length, num_beams, alpha, use_cache, banned, cuda_graph=False):
    batch = encoded.memory.shape[0]
    device = encoded.memory.device
    rows = batch * num_beams
    step_log_probs = _StepLogProbs(model, encoded.repeat_interleave(num_beams), use_cache, banned, cuda_graph,
                                   max_length)
    prefixes = torch.full((rows, 1), bos_id, dtype=torch.int64, device=device)
    # All beams of an image start identical: only the first is live, or the same extension appears K times.
    beam_scores = torch.full((batch, num_beams), -math.inf, dtype=torch.float64, device=device)
    beam_scores[:, 0] = 0.0
    hypotheses: List[List[Tuple[float, List[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    for length in range(1, max_length + 1):
        log_probs = step_log_probs(prefixes).double()  # [rows, V]
        vocab_size = log_probs.shape[1]
        candidates = (beam_scores.view(rows, 1) + log_probs).view(batch, num_beams * vocab_size)
        top_scores, top_index = candidates.topk(min(2 * num_beams, candidates.shape[1]), dim=1)
        top_beams, top_tokens = (top_index // vocab_size).tolist(), (top_index % vocab_size).tolist()
        top_scores_list = top_scores.tolist()
        penalty = gnmt_length_penalty(length, alpha)
        last_step = length == max_length

        next_scores = torch.full((batch, num_beams), -math.inf, dtype=torch.float64)
        next_rows = torch.arange(rows).view(batch, num_beams).clone()
        next_tokens = torch.full((batch, num_beams), eos_id, dtype=torch.int64)
        prefix_rows = prefixes.tolist()
        for item in range(batch):
            if done[item]:
                continue
            live = 0
            for rank, (score, beam, token) in enumerate(zip(top_scores_list[item], top_beams[item], top_tokens[item])):
                if not math.isfinite(score) or live == num_beams:
                    break
                row = item * num_beams + beam
                if token == eos_id or last_step:
                    if rank < num_beams:
                        ended = prefix_rows[row][1:] + ([] if token == eos_id else [token])
                        hypotheses[item].append((score / penalty, ended))
                    continue
                next_scores[item, live] = score
                next_rows[item, live] = row
                next_tokens[item, live] = token
                live += 1
            if last_step or len(hypotheses[item]) >= num_beams or live == 0:
                done[item] = True
                next_scores[item] = -math.inf
        if all(done):
            break
        next_rows = next_rows.view(rows).to(device)
        step_log_probs.reorder(next_rows)
        prefixes = torch.cat((prefixes.index_select(0, next_rows), next_tokens.view(rows, 1).to(device)), 1)
        beam_scores = next_scores.to(device)

    captions, scores = [], []
    for item_hypotheses in hypotheses:
        if not item_hypotheses:
            captions.append([])
            scores.append(-math.inf)
            continue
        best_score, best_tokens = max(item_hypotheses, key=lambda hypothesis: hypothesis[0])
        captions.append(best_tokens)
        scores.append(best_score)
    return captions, scores
