"""How fast can a ``tiny`` model learn to use the image on the synthetic set? Trains one objective alone:

* ``--objective itm``: the encoder and the ITM head; prints the ITM loss, the accuracy and the spread of the
  predicted match probability across each batch, window by window;
* ``--objective caption``: the image-only encoder pass and the caption decoder; prints the caption loss and,
  on 64 fixed training images with all their captions (unflipped, at the evaluation scale), the caption loss
  with each image's own captions and with the images swapped (the difference is 0 while the decoder ignores
  the image).

``--image-features colour-oracle`` replaces the ResNet with a fixed, exact colour detector: each image token
holds which palette colours and which background tint its cell (``--oracle-stride`` pixels) shows. Every
caption names its background's tint, so most mismatched pairs name a tint their image lacks, and a model that
reads these tokens can beat chance; if it still does not, what is slow is learning to compare the text with
the image tokens through attention, not the backbone.

``--text tint-only`` (ITM) cuts every text, once the batch's texts have been mismatched, down to
``[CLS] <tint> [SEP]``: the labels stay as they were, and the rest of the sentence no longer dilutes what
[CLS] reads.

    python scripts/learnability.py --data DATA [--objective caption] [--image-features colour-oracle] [--text tint-only] [--steps 1000]
"""
import argparse
import collections
from pathlib import Path

import torch

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.transforms import eval_transform, train_transform
from fastvlp.eval.colour_oracle import use_colour_oracle
from fastvlp.eval.image_dependence import caption_loss, swap_rows
from fastvlp.eval.tint_text import keep_tint_words
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.train.optim import build_optimizer
from fastvlp.train.pretrain_data import (BatchBuilder, PretrainingSamples, build_label_spaces, build_tokenizer,
                                         collate_pretraining_samples, read_corpus)
from fastvlp.train.schedule import build_scheduler, default_warmup_steps


def swap_test_set(corpus, classes, attributes, category_map, tokenizer, seed, count=64):
    """``count`` training images (unflipped, at the evaluation scale), each repeated once per caption, with
    the captions' tokens and, for every row, the row of the next image's first caption (the swap)."""
    samples = PretrainingSamples(corpus.records, eval_transform("tiny"), classes, attributes, category_map, seed=seed)
    picked = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + 1))[:count].tolist()
    images, captions, per_image = [], [], []
    for index in picked:
        sample = samples[(0, index)]
        if not isinstance(sample, dict):  # an unreadable image: leave it out
            continue
        record_captions = corpus.records[index].captions
        images += [sample["image"]] * len(record_captions)
        captions += list(record_captions)
        per_image.append(len(record_captions))
    nested = nested_tensor_from_images(images)
    encoded = tokenizer.encode_batch(captions)
    return nested.tensors, nested.mask, encoded.input_ids, encoded.attention_mask, swap_rows(per_image)


@torch.no_grad()
def swap_test_losses(model, test_set):
    """Caption loss with each image's own captions, then with every image swapped for the next one."""
    images, pixel_mask, ids, mask, swapped = test_set
    model.eval()
    own = caption_loss(model, images, pixel_mask, ids, mask)
    other = caption_loss(model, images[swapped], pixel_mask[swapped], ids, mask)
    model.train()
    return own, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="output of `fastvlp data synth`")
    parser.add_argument("--objective", choices=("itm", "caption"), default="itm")
    parser.add_argument("--image-features", choices=("backbone", "colour-oracle"), default="backbone")
    parser.add_argument("--text", choices=("caption", "tint-only"), default="caption",
                        help="ITM: the full texts, or only each text's background tint word")
    parser.add_argument("--oracle-stride", type=int, default=32, help="cell size of the colour oracle, in pixels")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: the tiny preset's")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 40:
        parser.error("--steps: expected at least 40 (the figure compares the first and last 20)")
    if args.text != "caption" and args.objective != "itm":
        parser.error("--text: tint-only applies to --objective itm")

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
        use_colour_oracle(model, args.oracle_stride)
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, default_warmup_steps(args.steps), args.steps)
    samples = PretrainingSamples(corpus.records, train_transform("tiny"), classes, attributes, category_map, seed=args.seed)
    build_batch = BatchBuilder(tokenizer, config.mlm_probability, config.itm_negative_ratio)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(samples), generator=generator).tolist()

    swap_set = swap_test_set(corpus, classes, attributes, category_map, tokenizer, args.seed) if args.objective == "caption" else None
    window = collections.defaultdict(lambda: collections.deque(maxlen=args.window))
    losses = []
    for step in range(args.steps):
        start = step * args.batch_size
        keys = [(start // len(order), order[(start + i) % len(order)]) for i in range(args.batch_size)]
        batch = build_batch(collate_pretraining_samples([samples[key] for key in keys]), generator)
        if args.objective == "itm":
            batch.mlm_labels = batch.targets = batch.caption_ids = batch.caption_attention_mask = None
            if args.text == "tint-only":
                batch = keep_tint_words(batch, tokenizer)
        else:
            batch.mlm_labels = batch.targets = batch.itm_labels = None
        output = model(batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_max_norm)
        optimizer.step()
        scheduler.step()
        if args.objective == "itm":
            matched = output.itm_logits.detach().softmax(-1)[:, 1]
            losses.append(output.losses["loss_itm"].item())
            window["accuracy"].append(float(((matched > 0.5).long() == batch.itm_labels).float().mean()))
            window["spread"].append(float(matched.std()))
        else:
            losses.append(output.losses["loss_cap"].item())
        window["loss"].append(losses[-1])
        if (step + 1) % args.window == 0:
            means = {name: sum(values) / len(values) for name, values in window.items()}
            if args.objective == "itm":
                print(f"step {step + 1}: itm loss {means['loss']:.3f}, accuracy {means['accuracy']:.3f}, "
                      f"spread of p(match) {means['spread']:.4f}", flush=True)
            else:
                own, swapped = swap_test_losses(model, swap_set)
                print(f"step {step + 1}: caption loss {means['loss']:.3f}; fixed images: own {own:.3f}, "
                      f"swapped images {swapped:.3f} (difference {swapped - own:+.3f})", flush=True)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"{args.objective} loss, mean of the last 20 steps / the first 20: {last:.3f} / {first:.3f} = {last / first:.3f}")


if __name__ == "__main__":
    main()
