"""Does a fresh `tiny` model learn image-text matching when matching is trivially easy, and after how many
steps? Trains ITM alone on solid-colour images with texts "a <colour> shape" (half of them naming another
colour; see :mod:`fastvlp.eval.matching_sanity`) and prints the loss window by window and the step at which
it first falls below 0.5 (chance is ln 2 = 0.693). ``--image-features colour-oracle`` replaces the ResNet
with an exact per-cell colour detector; ``--data-seed`` changes only the order of the batches.

    python scripts/matching_sanity.py [--steps 800] [--image-features colour-oracle] [--seed 0] [--data-seed 0 1 2]
"""
import argparse

import torch

from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.eval.colour_oracle import use_colour_oracle
from fastvlp.eval.matching_sanity import (COLOUR_NAMES, first_window_below, matching_text, train_matching,
                                          window_means)
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset

THRESHOLD = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-features", choices=("backbone", "colour-oracle"), default="backbone")
    parser.add_argument("--oracle-stride", type=int, default=32, help="cell size of the colour oracle, in pixels")
    parser.add_argument("--lr", type=float, default=None, help="default: the tiny preset's")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation")
    parser.add_argument("--data-seed", type=int, nargs="+", default=[0], help="one run per batch order")
    args = parser.parse_args()
    if args.steps < args.window:
        parser.error("--steps: expected at least --window steps")

    tokenizer = WordPieceTokenizer.train_on_texts([matching_text(c) for c in COLOUR_NAMES])
    overrides = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                     max_text_len=max(tokenizer.max_length, 2), num_classes=1, num_attributes=0)
    if args.lr is not None:
        overrides.update(lr=args.lr, lr_backbone=args.lr)
    config = get_preset("tiny", **overrides)
    for data_seed in args.data_seed:
        torch.manual_seed(args.seed)
        model = E2EVLP(config)
        if args.image_features == "colour-oracle":
            # Solid palette colours leave no background: the palette channels alone.
            use_colour_oracle(model, args.oracle_stride, tints=False)
        losses = train_matching(model, tokenizer, args.steps, args.batch_size, data_seed)
        means = window_means(losses, args.window)
        print(f"data seed {data_seed}: " + " ".join(f"{(i + 1) * args.window}:{m:.3f}" for i, m in enumerate(means)))
        below = first_window_below(losses, THRESHOLD, args.window)
        print(f"data seed {data_seed}: loss first below {THRESHOLD} in the window ending at step "
              f"{below if below is not None else 'none (not within ' + str(args.steps) + ' steps)'}", flush=True)


if __name__ == "__main__":
    main()
