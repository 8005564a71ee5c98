"""BERT-style text embeddings against their formula in float64."""
import pytest
import torch
import torch.nn.functional as F

from fastvlp.models.text_embeddings import TextEmbeddings


def make_embeddings():
    torch.manual_seed(0)
    embeddings = TextEmbeddings(vocab_size=30, d_model=8, max_len=10, type_vocab_size=2, pad_token_id=0, dropout=0.3).eval()
    with torch.no_grad():  # a LayerNorm that is not the identity
        embeddings.layer_norm.weight.uniform_(0.5, 1.5)
        embeddings.layer_norm.bias.normal_()
    return embeddings


def reference(embeddings, ids, types, offset=0):
    word = embeddings.word_embeddings.weight.double()[ids]
    position = embeddings.position_embeddings.weight.double()[torch.arange(offset, offset + ids.shape[1])]
    segment = embeddings.token_type_embeddings.weight.double()[types]
    norm = embeddings.layer_norm
    return F.layer_norm(word + position + segment, (8,), norm.weight.double(), norm.bias.double(), norm.eps)


def test_matches_formula():
    embeddings = make_embeddings()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(30, (3, 7), generator=generator)
    types = torch.randint(2, (3, 7), generator=generator)
    torch.testing.assert_close(embeddings(ids, types).double(), reference(embeddings, ids, types), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeddings(ids).double(), reference(embeddings, ids, torch.zeros_like(ids)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        embeddings(ids[:, :3], position_offset=4).double(), reference(embeddings, ids[:, :3], torch.zeros(3, 3, dtype=torch.long), 4),
        rtol=1e-5, atol=1e-5,
    )


def test_initialisation_and_dropout():
    embeddings = make_embeddings()
    assert torch.equal(embeddings.word_embeddings.weight[0], torch.zeros(8))  # the padding row
    assert 0.01 < embeddings.word_embeddings.weight[1:].std() < 0.03  # BERT's N(0, 0.02)
    ids = torch.randint(1, 30, (4, 9))
    embeddings.train()
    assert (embeddings(ids) == 0).float().mean() > 0.1  # dropout 0.3 acts in training
    embeddings.eval()
    torch.testing.assert_close(embeddings(ids), embeddings(ids))


def test_invalid_inputs():
    embeddings = make_embeddings()
    with pytest.raises(ValueError, match="max_len"):
        embeddings(torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        embeddings(torch.ones(1, 5, dtype=torch.long), position_offset=6)
    with pytest.raises(ValueError, match="input_ids"):
        embeddings(torch.ones(1, 5))
    with pytest.raises(ValueError, match="token_type_ids"):
        embeddings(torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pad_token_id"):
        TextEmbeddings(10, 8, pad_token_id=10)
