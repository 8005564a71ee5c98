"""How fast can image-text matching be learned on the synthetic set? Trains only the encoder and the ITM head
of a ``tiny`` model (no MLM, detection or captioning) and prints the ITM loss, the accuracy and the spread of
the predicted match probability across each batch, window by window.

``--image-features colour-oracle`` replaces the ResNet with a fixed, exact colour detector: each image token
holds the fraction of its cell covered by each palette colour. Half of the mismatched pairs name a colour
their image lacks, so a model that reads these tokens can beat chance; if the loss still stays at log 2,
what is slow is learning to compare the text with the image tokens through [CLS], not the backbone.

    python scripts/itm_learnability.py --data DATA [--image-features colour-oracle] [--steps 1000]
"""
import argparse
import collections
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastvlp.data.synth.palette import COLOURS
from fastvlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.train.optim import build_optimizer
from fastvlp.train.pretrain_data import (BatchBuilder, PretrainingSamples, build_label_spaces, build_tokenizer,
                                         collate_pretraining_samples, read_corpus)
from fastvlp.train.schedule import build_scheduler, default_warmup_steps

# RGB distance (0..1 a channel) under which a pixel counts as a palette colour after JPEG and resizing.
COLOUR_TOLERANCE = 0.15


class ColourOracle(nn.Module):
    """Stands in for the ResNet body: per cell of ``stride`` pixels, the fraction of pixels of each palette
    colour (``[B, colours, H / stride, W / stride]``), under the key the backbone reads."""

    def __init__(self, stride: int, output_key: str):
        super().__init__()
        self.stride, self.output_key = stride, output_key
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None])
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None])

    def forward(self, images):
        pixels = images * self.std + self.mean
        distance = (pixels[:, None] - self.palette[None, :, :, None, None]).norm(dim=2)
        covered = (distance < COLOUR_TOLERANCE).float()
        return {self.output_key: F.avg_pool2d(covered, self.stride, self.stride, ceil_mode=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="output of `fastvlp data synth`")
    parser.add_argument("--image-features", choices=("backbone", "colour-oracle"), default="backbone")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: the tiny preset's")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = read_corpus(args.data)
    tokenizer = build_tokenizer(corpus, None)
    classes, attributes, category_map = build_label_spaces(args.data, corpus)
    overrides = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, max_text_len=max(tokenizer.max_length, 2),
                     num_classes=len(classes), num_attributes=len(attributes) if attributes else 0)
    if args.lr is not None:
        overrides.update(lr=args.lr, lr_backbone=args.lr)
    config = get_preset("tiny", **overrides)
    torch.manual_seed(args.seed)
    model = E2EVLP(config)
    if args.image_features == "colour-oracle":
        model.backbone.body = ColourOracle(32, model.backbone.output)
        model.backbone.input_proj = nn.Conv2d(len(COLOURS), config.d_model, kernel_size=1)
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, default_warmup_steps(args.steps), args.steps)
    samples = PretrainingSamples(corpus.records, train_transform("tiny"), classes, attributes, category_map, seed=args.seed)
    build_batch = BatchBuilder(tokenizer, config.mlm_probability, config.itm_negative_ratio)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()

    window = collections.defaultdict(lambda: collections.deque(maxlen=args.window))
    losses = []
    for step in range(args.steps):
        start = step * args.batch_size
        keys = [(start // len(order), order[(start + i) % len(order)]) for i in range(args.batch_size)]
        batch = build_batch(collate_pretraining_samples([samples[key] for key in keys]), generator)
        batch.mlm_labels = batch.targets = batch.caption_ids = batch.caption_attention_mask = None  # ITM alone
        output = model(batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
        optimizer.step()
        scheduler.step()
        matched = output.itm_logits.detach().softmax(-1)[:, 1]
        losses.append(output.losses["loss_itm"].item())
        window["loss"].append(losses[-1])
        window["accuracy"].append(float(((matched > 0.5).long() == batch.itm_labels).float().mean()))
        window["spread"].append(float(matched.std()))
        if (step + 1) % args.window == 0:
            means = {name: sum(values) / len(values) for name, values in window.items()}
            print(f"step {step + 1}: itm loss {means['loss']:.3f}, accuracy {means['accuracy']:.3f}, "
                  f"spread of p(match) {means['spread']:.4f}", flush=True)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"ITM loss, mean of the last 20 steps / the first 20: {last:.3f} / {first:.3f} = {last / first:.3f}")


if __name__ == "__main__":
    main()
