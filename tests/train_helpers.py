"""Shared helpers of the training tests: a tiny synthetic corpus and a very small model configuration."""
from __future__ import annotations

from pathlib import Path

from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.data.transforms import ScaleConfig

# Far smaller than the tiny preset, so that a CPU step takes a fraction of a second.
SMALL_MODEL = dict(d_model=32, num_heads=2, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1, num_queries=5)
SMALL_SCALE = ScaleConfig(short_sides=(64, 72), max_size=96, eval_short_side=64)


def write_corpus(root: Path, num_images: int = 12, seed: int = 0) -> Path:
    """The synthetic coco + vg set, with a WordPiece vocab.txt of its captions at ``root/vocab.txt``, which
    the runs that are compared share (so that none of them trains a tokenizer of its own)."""
    from fastvlp.train.pretrain_data import build_tokenizer, read_corpus

    data = root / "data"
    write_synthetic_dataset(data, num_images, seed=seed, datasets=("coco", "vg"))
    vocab = build_tokenizer(read_corpus(data), None).backend.get_vocab()
    (root / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    return data


def small_options(data: Path, out: Path, **changes):
    from fastvlp.train.pretrain import PretrainOptions

    values = dict(preset="tiny", data=data, out=out, max_steps=4, batch_size=2, seed=3, progress=False,
                  scale=SMALL_SCALE, config_overrides=dict(SMALL_MODEL), device="cpu", save_every=1000,
                  vocab=Path(data).parent / "vocab.txt")
    values.update(changes)
    return PretrainOptions(**values)
