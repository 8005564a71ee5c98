"""Cut each text of a pre-training batch down to ``[CLS] <background tint> [SEP]``, for learning probes.

Every synthetic caption names its image's background tint, and a mismatched caption usually names another
one, so the tint word alone decides most image-text matching labels. Keeping only that word, after the
batch's texts have been mismatched, leaves the labels as they were and removes the rest of the sentence
that [CLS] would otherwise attend to: comparing a probe on these texts with one on the full captions shows
how much the other words slow down learning to compare the text with the image.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from fastvlp.data.synth.palette import BACKGROUNDS
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.models.pretraining_batch import PretrainingBatch


def tint_token_ids(tokenizer: WordPieceTokenizer, names: Iterable[str] = tuple(BACKGROUNDS)) -> set[int]:
    """The ids of the tint names, each of which must be one known token of ``tokenizer``'s vocabulary."""
    ids = set()
    for name in names:
        pieces = tokenizer.encode(name, add_special_tokens=False)
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_id:
            raise ValueError(f"tokenizer: expected the tint {name!r} as one known token, got {tokenizer.tokenize(name)}")
        ids.add(pieces[0])
    return ids


def keep_tint_words(batch: PretrainingBatch, tokenizer: WordPieceTokenizer) -> PretrainingBatch:
    """A copy of ``batch`` with each text replaced by ``[CLS] tint [SEP]``, the tint being the last tint word of the
    row (``[CLS] [SEP]`` when MLM masking hid it or the text has none). MLM labels no longer line up with
    the texts and are dropped; images, ITM labels, captions and targets are kept."""
    if not isinstance(batch, PretrainingBatch):
        raise TypeError(f"batch: expected a PretrainingBatch, got {type(batch).__name__}")
    tints = tint_token_ids(tokenizer)
    rows = []
    for ids, mask in zip(batch.input_ids.tolist(), batch.text_attention_mask.tolist()):
        found = [token for token, real in zip(ids, mask) if real and token in tints]
        rows.append([tokenizer.cls_id, *found[-1:], tokenizer.sep_id])
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=batch.input_ids.dtype)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = True
    return dataclasses.replace(
        batch,
        input_ids=input_ids.to(batch.input_ids.device),
        text_attention_mask=attention_mask.to(batch.text_attention_mask.device),
        token_type_ids=None,
        mlm_labels=None,
    )
