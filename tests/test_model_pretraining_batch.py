"""MLM masking (15%, 80/10/10), ITM mismatching, and the pre-training batch they build."""
import pytest
import torch

from fastvlp.models import PretrainingBatch, make_pretraining_batch, mask_tokens, mismatch_texts
from fastvlp.models.masking import IGNORE_INDEX

SPECIAL = (0, 1, 2, 3, 4)
MASK_ID, VOCAB = 4, 60


def text_batch(rows, length, generator):
    ids = torch.randint(len(SPECIAL), VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    mask = torch.arange(length)[None] < lengths[:, None]
    ids[:, 0] = 2
    ids[torch.arange(rows), lengths - 1] = 3
    return ids.masked_fill(~mask, 0), mask


def test_mask_tokens_proportions_and_labels():
    generator = torch.Generator().manual_seed(0)
    ids, mask = text_batch(400, 40, generator)
    masked, labels = mask_tokens(ids, mask, special_token_ids=SPECIAL, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=generator)
    chosen = labels != IGNORE_INDEX
    eligible = mask & (ids >= len(SPECIAL))
    assert not (chosen & ~eligible).any()  # never padding, [CLS] or [SEP]
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    share = chosen.sum() / eligible.sum()
    assert 0.13 < share < 0.17
    replaced_by_mask = (masked == MASK_ID) & chosen
    kept = (masked == ids) & chosen
    randomised = chosen & ~replaced_by_mask & ~kept
    total = chosen.sum().item()
    assert 0.76 < replaced_by_mask.sum().item() / total < 0.84
    # A random replacement can draw the original token (1 in 55): "kept" is 10% plus a little.
    assert 0.07 < kept.sum().item() / total < 0.13 and 0.07 < randomised.sum().item() / total < 0.13
    assert (masked[randomised] >= len(SPECIAL)).all()  # random tokens are never special


def test_mask_tokens_is_reproducible():
    ids, mask = text_batch(8, 12, torch.Generator().manual_seed(1))
    first = mask_tokens(ids, mask, special_token_ids=SPECIAL, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=torch.Generator().manual_seed(5))
    second = mask_tokens(ids, mask, special_token_ids=SPECIAL, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="attention_mask"):
        mask_tokens(ids, mask.long(), special_token_ids=SPECIAL, mask_token_id=MASK_ID, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, mask, special_token_ids=SPECIAL, mask_token_id=VOCAB, vocab_size=VOCAB)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8, 9])
def test_mismatch_texts(batch_size):
    generator = torch.Generator().manual_seed(batch_size)
    source, labels = mismatch_texts(batch_size, generator=generator)
    moved = source != torch.arange(batch_size)
    negatives = batch_size // 2 if batch_size > 1 else 0
    assert moved.sum().item() == negatives
    assert torch.equal(labels, (~moved).long())
    assert ((source >= 0) & (source < batch_size)).all()
    if negatives >= 2:
        assert sorted(source.tolist()) == list(range(batch_size))  # rolled among themselves: none duplicated


def test_mismatch_texts_counts_same_image_as_matched():
    image_ids = [7, 7, 7, 7, 8, 8]
    source, labels = mismatch_texts(6, generator=torch.Generator().manual_seed(0), image_ids=image_ids)
    for row, text in enumerate(source.tolist()):
        assert labels[row] == int(image_ids[row] == image_ids[text])


def test_make_pretraining_batch_moves_texts_and_masks_matched_rows_only():
    generator = torch.Generator().manual_seed(3)
    ids, mask = text_batch(6, 10, generator)
    images, pixel_mask = torch.randn(6, 3, 32, 32), torch.zeros(6, 32, 32, dtype=torch.bool)
    batch = make_pretraining_batch(
        images, pixel_mask, ids, mask, special_token_ids=SPECIAL, mask_token_id=MASK_ID, vocab_size=VOCAB,
        generator=torch.Generator().manual_seed(4), mlm_probability=0.5,
    )
    source, labels = mismatch_texts(6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(batch.itm_labels, labels)
    assert torch.equal(batch.text_attention_mask, mask[source])
    unmasked = torch.where(batch.mlm_labels != IGNORE_INDEX, batch.mlm_labels, batch.input_ids)
    changed = unmasked != ids[source]
    assert not changed[labels == 1].any()  # matched rows: only MLM corruption (undone above)
    assert (batch.mlm_labels[labels == 0] == IGNORE_INDEX).all()
    assert (batch.mlm_labels[labels == 1] != IGNORE_INDEX).any()


def test_batch_validation_and_device_move():
    generator = torch.Generator().manual_seed(5)
    ids, mask = text_batch(2, 6, generator)
    images, pixel_mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}, None]
    batch = PretrainingBatch(images, pixel_mask, ids, mask, targets=targets)
    moved = batch.to("cpu")
    assert moved.targets[1] is None and torch.equal(moved.targets[0]["labels"], targets[0]["labels"])
    with pytest.raises(ValueError, match="caption_ids and caption_attention_mask"):
        PretrainingBatch(images, pixel_mask, ids, mask, caption_ids=ids)
    with pytest.raises(ValueError, match="text_attention_mask"):
        PretrainingBatch(images, pixel_mask, ids, mask[:, :3])
    with pytest.raises(ValueError, match="itm_labels"):
        PretrainingBatch(images, pixel_mask, ids, mask, itm_labels=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        PretrainingBatch(images, pixel_mask, ids, mask, targets=[{"boxes": torch.rand(1, 4)}, None])
