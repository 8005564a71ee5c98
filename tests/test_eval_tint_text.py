import pytest
import torch

from fastvlp.data.synth.palette import BACKGROUNDS
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.eval.tint_text import keep_tint_words, tint_token_ids
from fastvlp.models.pretraining_batch import PretrainingBatch

TEXTS = [
    "a red circle on pink",
    "two blue squares on a striped cyan background",
    "a green star",  # no tint
    "a white square on lime",  # 'white' is also a tint name: the last tint word counts
]


@pytest.fixture(scope="module")
def tokenizer():
    return WordPieceTokenizer.train_on_texts(TEXTS + [f"a shape on {name}" for name in BACKGROUNDS])


def _batch(tokenizer, texts):
    encoded = tokenizer.encode_batch(texts)
    generator = torch.Generator().manual_seed(0)
    size = len(texts)
    return PretrainingBatch(
        images=torch.randn(size, 3, 8, 8, generator=generator),
        pixel_mask=torch.zeros(size, 8, 8, dtype=torch.bool),
        input_ids=encoded.input_ids,
        text_attention_mask=encoded.attention_mask,
        mlm_labels=torch.full_like(encoded.input_ids, -100),
        itm_labels=torch.tensor([1, 0, 1, 0][:size]),
    )


def _word(tokenizer, word):
    (token,) = tokenizer.encode(word, add_special_tokens=False)
    return token


def test_each_text_becomes_cls_tint_sep(tokenizer):
    batch = _batch(tokenizer, TEXTS)
    original_ids = batch.input_ids.clone()
    cut = keep_tint_words(batch, tokenizer)
    cls_id, sep_id, pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    expected = torch.tensor([
        [cls_id, _word(tokenizer, "pink"), sep_id],
        [cls_id, _word(tokenizer, "cyan"), sep_id],
        [cls_id, sep_id, pad],
        [cls_id, _word(tokenizer, "lime"), sep_id],
    ])
    assert torch.equal(cut.input_ids, expected)
    assert torch.equal(cut.text_attention_mask, torch.tensor([[True] * 3, [True] * 3, [True, True, False], [True] * 3]))
    assert cut.mlm_labels is None and cut.token_type_ids is None
    assert torch.equal(cut.itm_labels, batch.itm_labels) and cut.images is batch.images
    assert torch.equal(batch.input_ids, original_ids), "the input batch must not change"


def test_padding_tokens_are_never_read(tokenizer):
    batch = _batch(tokenizer, ["a red circle", "a blue square on a plain grey background"])
    # A tint id placed under the padding of the shorter row must not be picked up.
    padding = ~batch.text_attention_mask[0]
    assert padding.any()
    batch.input_ids[0, padding] = _word(tokenizer, "cream")
    cut = keep_tint_words(batch, tokenizer)
    assert cut.text_attention_mask[0].sum() == 2
    assert cut.input_ids[1, 1] == _word(tokenizer, "grey")


def test_tint_ids_need_one_token_per_name(tokenizer):
    assert len(tint_token_ids(tokenizer)) == len(BACKGROUNDS)
    narrow = WordPieceTokenizer.train_on_texts(["a red circle"])
    with pytest.raises(ValueError, match="tokenizer"):
        tint_token_ids(narrow)


def test_rejects_other_batches(tokenizer):
    with pytest.raises(TypeError, match="batch"):
        keep_tint_words({"input_ids": torch.zeros(1, 3)}, tokenizer)
