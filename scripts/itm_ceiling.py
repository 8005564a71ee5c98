"""What image-text matching loss could pre-training reach on the synthetic set, and how fast, if the model
perceived every scene exactly? Trains :class:`fastvlp.eval.itm_ceiling.MatchingProbe` on exact scene and text
features (see that module) with pre-training's own batches: the same pairs, mismatches and MLM masking, at
the same batch size. For each learning rate it prints the ITM loss window by window and the figure
pre-training is held to: the mean of the last 20 steps over the mean of the first 20.

    python scripts/itm_ceiling.py --data DATA [--steps 300] [--lr 1e-3 3e-3 1e-2] [--batch-size 8]
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from fastvlp.eval.itm_ceiling import MatchingProbe, phrase_token_ids, scene_features, text_features
from fastvlp.models.presets import get_preset
from fastvlp.train.pretrain_data import (BatchBuilder, PretrainingSamples, build_label_spaces, build_tokenizer,
                                         collate_pretraining_samples, read_corpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="output of `fastvlp data synth`")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 40:
        parser.error("--steps: expected at least 40 (the figure compares the first and last 20)")

    corpus = read_corpus(args.data)
    tokenizer = build_tokenizer(corpus, None)
    classes, attributes, category_map = build_label_spaces(args.data, corpus)
    preset = get_preset("tiny")
    build_batch = BatchBuilder(tokenizer, preset.mlm_probability, preset.itm_negative_ratio)
    phrases = phrase_token_ids(lambda text: tokenizer.encode_batch([text], add_special_tokens=False).input_ids[0].tolist())
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    # Features once per step, shared by every learning rate's probe: each sees exactly the same batches.
    samples = PretrainingSamples(corpus.records, train_transform("tiny"), classes, attributes, category_map, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    steps = []
    for step in range(args.steps):
        start = step * args.batch_size
        keys = [(start // len(order), order[(start + i) % len(order)]) for i in range(args.batch_size)]
        batch = build_batch(collate_pretraining_samples([samples[key] for key in keys]), generator)
        pixels = (batch.images * std + mean).masked_fill(batch.pixel_mask[:, None], 0.0)
        text = text_features(batch.input_ids, batch.text_attention_mask, tokenizer.vocab_size, phrases)
        scene = scene_features(batch.targets, pixels, batch.pixel_mask, classes.names)
        steps.append((text, scene, batch.itm_labels))

    for lr in args.lr:
        torch.manual_seed(args.seed)
        probe = MatchingProbe(steps[0][0].shape[1], steps[0][1].shape[1])
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
        losses = []
        for step, (text, scene, labels) in enumerate(steps):
            loss = F.cross_entropy(probe(text, scene), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        windows = [sum(losses[i:i + args.window]) / len(losses[i:i + args.window]) for i in range(0, len(losses), args.window)]
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        print(f"lr {lr:g}: windows of {args.window} steps: " + " ".join(f"{w:.3f}" for w in windows))
        print(f"lr {lr:g}: ITM loss, mean of the last 20 steps / the first 20: {last:.3f} / {first:.3f} = {last / first:.3f}", flush=True)


if __name__ == "__main__":
    main()
