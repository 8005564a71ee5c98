"""WordPiece tokenizer: from a vocab.txt, trained on captions, saved and loaded, batched with masks."""

import random

import pytest
import torch

from fastvlp.data.tokenizer import MAX_LENGTH, WordPieceTokenizer

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "star",
    "left",
    "of",
    "the",
    "two",
    "and",
    "is",
    "on",
    "background",
]
SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    tokens = SPECIALS + WORDS + [".", ",", "##s", "##ish", "purple"]
    path.write_text("\n".join(tokens) + "\n")
    return path, tokens


def _random_caption(rng, length):
    return " ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + "."


def test_from_vocab_file_ids_and_round_trip(vocab_file):
    path, tokens = vocab_file
    tokenizer = WordPieceTokenizer.from_vocab_file(path)
    assert tokenizer.vocab_size == len(tokens) and tokenizer.max_length == MAX_LENGTH
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0,
        4,
        5,
        6,
        7,
    )
    rng = random.Random()
    for _ in range(10):
        caption = _random_caption(rng, rng.randint(1, 12))
        ids = tokenizer.encode(caption)
        expected = [tokens.index(w) for w in caption.lower().rstrip(".").split()] + [tokens.index(".")]
        assert ids == [5] + expected + [6]
        assert tokenizer.decode(ids) == caption.lower()
    assert tokenizer.tokenize("Greenish stars, RED!") == [
        "[CLS]",
        "green",
        "##ish",
        "star",
        "##s",
        ",",
        "red",
        "[UNK]",
        "[SEP]",
    ]


def test_encode_batch_pads_and_truncates(vocab_file):
    path, tokens = vocab_file
    tokenizer = WordPieceTokenizer.from_vocab_file(path, max_length=12)
    rng = random.Random()
    texts = [_random_caption(rng, n) for n in (3, 1, 25, 7)]
    batch = tokenizer.encode_batch(texts)
    lengths = [min(n + 3, 12) for n in (3, 1, 25, 7)]  # words, '.', [CLS], [SEP]
    assert batch.input_ids.shape == (4, 12) and batch.input_ids.dtype == torch.int64
    assert batch.attention_mask.tolist() == [[j < n for j in range(12)] for n in lengths]
    assert torch.equal(batch.padding_mask, ~batch.attention_mask)
    for row, n, text in zip(batch.input_ids, lengths, texts):
        assert row[0] == tokenizer.cls_id and row[n - 1] == tokenizer.sep_id
        assert (row[n:] == tokenizer.pad_id).all()
        assert row[:n].tolist() == tokenizer.encode(text)
    assert tokenizer.decode_batch(batch.input_ids)[1] == texts[1].lower()
    short = tokenizer.encode_batch(["a red star", "two"])
    assert short.input_ids.shape == (2, 5)  # padded to the longest in the batch, not to max_length
    plain = tokenizer.encode_batch(["a red star"], add_special_tokens=False).input_ids.tolist()
    assert plain == [[tokens.index("a"), tokens.index("red"), tokens.index("star")]]


def test_train_save_load(tmp_path):
    rng = random.Random()
    captions = [_random_caption(rng, rng.randint(2, 10)) for _ in range(300)]
    tokenizer = WordPieceTokenizer.train_on_texts(captions, vocab_size=200)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert tokenizer.vocab_size <= 200
    for caption in captions[:20]:
        ids = tokenizer.encode(caption)
        assert tokenizer.unk_id not in ids and tokenizer.decode(ids) == caption.lower()
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = WordPieceTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.max_length == tokenizer.max_length
    batch = captions[:8]
    assert torch.equal(loaded.encode_batch(batch).input_ids, tokenizer.encode_batch(batch).input_ids)


def test_invalid_inputs(vocab_file, tmp_path):
    tokenizer = WordPieceTokenizer.from_vocab_file(vocab_file[0])
    with pytest.raises(ValueError, match="texts"):
        tokenizer.encode_batch([])
    with pytest.raises(ValueError, match="texts"):
        tokenizer.encode_batch("a red star")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenizer.encode_batch(["a", 3])
    with pytest.raises(ValueError, match="max_length"):
        WordPieceTokenizer.from_vocab_file(vocab_file[0], max_length=1)
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "absent.txt")
    (tmp_path / "no_specials.txt").write_text("a\nb\n[PAD]\n")
    with pytest.raises(ValueError, match=r"^path: expected a vocabulary with the special tokens .*no_specials.txt lacks "
                                         r"\['\[UNK\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]$"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "no_specials.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match=r"^path: expected a vocab.txt \(UTF-8, one token a line\), .*binary.txt is not one"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "binary.txt")
    with pytest.raises(ValueError, match="vocab_size"):
        WordPieceTokenizer.train_on_texts(["a b"], vocab_size=3)


def test_trained_vocabulary_is_the_same_in_every_process():
    """Two separately started runs on the same captions must get the same token ids."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys; from fastvlp.data.tokenizer import WordPieceTokenizer\n"
        "texts = ['a red circle left of two blue squares', 'three green triangles above the purple circle',"
        " 'the small yellow square', 'two large red triangles']\n"
        "print(json.dumps(sorted(WordPieceTokenizer.train_on_texts(texts, vocab_size=60).backend.get_vocab().items())))"
    )
    vocabularies = [
        json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
        for _ in range(2)
    ]
    assert vocabularies[0] == vocabularies[1]
    assert ["[PAD]", 0] in vocabularies[0] and len(vocabularies[0]) == 60
