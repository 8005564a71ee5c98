"""BERT-style WordPiece tokenisation on the `tokenizers` library: BERT's normaliser (lower case) and
pre-tokeniser, a WordPiece model from a local vocab.txt or trained on the training captions, and the
[CLS] text [SEP] post-processor. Sequences are truncated to `max_length` tokens (40 in the paper)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
MAX_LENGTH = 40


@dataclass
class EncodedText:
    """`input_ids` [B, L] int64, padded with the pad id; `attention_mask` [B, L] bool, True = real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def padding_mask(self) -> torch.Tensor:
        """True = padding, the key_padding_mask convention of attention modules."""
        return ~self.attention_mask


def _configure(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")


class WordPieceTokenizer:
    """A configured `tokenizers.Tokenizer` with the special-token ids the model needs."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_LENGTH) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"tokenizer: the vocabulary lacks the special tokens {missing}")
        # Registering the special tokens (they keep their vocabulary ids) keeps them whole when they occur in
        # text and lets decode() drop them.
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
        self._tokenizer, self.max_length = tokenizer, max_length
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(token) for token in SPECIAL_TOKENS
        )
        tokenizer.post_processor = processors.BertProcessing((SEP, self.sep_id), (CLS, self.cls_id))
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD)

    @classmethod
    def from_vocab_file(cls, path: str | Path, max_length: int = MAX_LENGTH) -> WordPieceTokenizer:
        """From a BERT vocab.txt (one token a line, the line number its id), e.g. BERT's uncased vocabulary.
        Raises ValueError naming the file when it is not UTF-8 text or lacks a special token."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such vocabulary file: {path}")
        try:
            vocab = models.WordPiece.read_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception (e.g. for bytes that are not UTF-8)
            raise ValueError(f"path: expected a vocab.txt (UTF-8, one token a line), {path} is not one "
                             f"({error})") from None
        missing = [token for token in SPECIAL_TOKENS if token not in vocab]
        if missing:
            raise ValueError(f"path: expected a vocabulary with the special tokens {list(SPECIAL_TOKENS)}, {path} "
                             f"lacks {missing}")
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        _configure(tokenizer)
        return cls(tokenizer, max_length)

    @classmethod
    def train_on_texts(
        cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1, max_length: int = MAX_LENGTH
    ) -> WordPieceTokenizer:
        """A WordPiece vocabulary from `texts`, for data without a BERT vocabulary: the special tokens first
        ([PAD] is 0), then every character (alone and as ##continuation), then the most frequent words, up
        to `vocab_size` tokens when the characters leave room. The same texts always give the same ids."""
        if isinstance(texts, str):
            raise TypeError("texts: expected an iterable of str, got a single str")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size: expected an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency: expected a positive int, got {min_frequency!r}")
        # tokenizers' WordPieceTrainer breaks ties between merges in hash order, so two runs on the same
        # captions get different vocabularies. This vocabulary is deterministic instead: BERT's normaliser
        # and pre-tokeniser split the words, the most frequent whole words (ties alphabetical) fill the
        # vocabulary, and every character seen, alone and as a ##continuation, keeps unseen words spellable.
        probe = Tokenizer(models.WordPiece({UNK: 0}, unk_token=UNK))
        _configure(probe)
        counts: Counter = Counter()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a str, got {type(text).__name__}")
            normalised = probe.normalizer.normalize_str(text)
            counts.update(word for word, _ in probe.pre_tokenizer.pre_tokenize_str(normalised))
        characters = sorted({character for word in counts for character in word})
        tokens = list(SPECIAL_TOKENS) + characters + [f"##{character}" for character in characters]
        known = set(tokens)
        for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            if len(tokens) >= vocab_size:
                break
            if count >= min_frequency and word not in known:
                tokens.append(word)
                known.add(word)
        vocab = {token: index for index, token in enumerate(tokens)}
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        _configure(tokenizer)
        return cls(tokenizer, max_length)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (vocabulary, settings and max length), readable by `load`."""
        self._tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> WordPieceTokenizer:
        """Read a tokenizer.json written by `save`."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"path: no such tokenizer file: {path}")
        tokenizer = Tokenizer.from_file(str(path))
        truncation = tokenizer.truncation
        return cls(tokenizer, truncation["max_length"] if truncation else MAX_LENGTH)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text`, with [CLS] and [SEP]."""
        return self._tokenizer.encode(self._check_text(text, "text")).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, truncated to `max_length` (special tokens included), unpadded."""
        encoding = self._tokenizer.encode(self._check_text(text, "text"), add_special_tokens=add_special_tokens)
        return [i for i, keep in zip(encoding.ids, encoding.attention_mask) if keep]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> EncodedText:
        """Ids of a batch, padded to its longest sequence (at most `max_length`)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise ValueError("texts: expected a non-empty sequence of str")
        checked = [self._check_text(text, f"texts[{i}]") for i, text in enumerate(texts)]
        encodings = self._tokenizer.encode_batch(checked, add_special_tokens=add_special_tokens)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        return EncodedText(ids, mask)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of token ids (padding and, by default, the other special tokens removed)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("ids: expected a [B, L] tensor")
        return self._tokenizer.decode_batch(ids.tolist(), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _check_text(text: str, argument: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{argument}: expected a str, got {type(text).__name__}")
        return text
