"""Does a fresh `tiny` model learn image-text matching when matching is trivially easy, and after how many
steps? Trains ITM alone on solid-colour images with texts "a <colour> shape" (half of them naming another
colour; see :mod:`fastvlp.eval.matching_sanity`) and prints the loss window by window and the step at which
it first falls below 0.5 (chance is ln 2 = 0.693). ``--image-features colour-oracle`` replaces the ResNet
with an exact per-cell colour detector; ``--data-seed`` changes only the order of the batches. ``--variance``
also prints, before and after training, how much of the [CLS] vector (and of the colour word's) depends on
the image, on the text and on whether they match (:func:`fastvlp.eval.matching_sanity.match_variance`).

    python scripts/matching_sanity.py [--steps 800] [--image-features colour-oracle] [--seed 0] [--data-seed 0 1 2] [--variance]
"""
import argparse

import torch

from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.eval.colour_oracle import use_colour_oracle
from fastvlp.eval.matching_sanity import (COLOUR_NAMES, first_window_below, match_variance, matching_text,
                                          train_matching, window_means)
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset

THRESHOLD = 0.5


def print_variance(title, result) -> None:
    print(f"{title}: share of each vector's mean squared norm")
    for name, parts in result.items():
        print(f"  {name:12s} " + " ".join(f"{part} {value:.2e}" for part, value in parts.items()))


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
    parser.add_argument("--variance", action="store_true", help="print match_variance before and after training")
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
        if args.variance:
            print_variance(f"data seed {data_seed}, before training", match_variance(model, tokenizer))
        losses = train_matching(model, tokenizer, args.steps, args.batch_size, data_seed)
        if args.variance:
            print_variance(f"data seed {data_seed}, after {args.steps} steps", match_variance(model, tokenizer))
        means = window_means(losses, args.window)
        print(f"data seed {data_seed}: " + " ".join(f"{(i + 1) * args.window}:{m:.3f}" for i, m in enumerate(means)))
        below = first_window_below(losses, THRESHOLD, args.window)
        print(f"data seed {data_seed}: loss first below {THRESHOLD} in the window ending at step "
              f"{below if below is not None else 'none (not within ' + str(args.steps) + ' steps)'}", flush=True)


if __name__ == "__main__":
    main()
