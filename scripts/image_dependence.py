"""Does a checkpoint's caption decoder look at the image? On the captioning test split it prints:

* the caption loss (token cross-entropy, teacher-forced) with each image's own captions, and with every image
  swapped for the next one's: a decoder that reads the image does worse on the swapped images, one that
  has only learnt the captions' language does the same on both;
* the normalised entropy of each decoder layer's cross-attention over the image tokens, per caption token,
  averaged: 1.0 is uniform attention (the decoder sees only the mean of the image tokens), lower is
  attention that picks out some tokens.

It takes a pre-training checkpoint or a captioning fine-tune (``checkpoints/step-N`` directories).

    python scripts/image_dependence.py CHECKPOINT --data DATA [--num-images 64]
"""
import argparse
from pathlib import Path

import torch

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.image_records import ImageRecordDataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform
from fastvlp.eval.image_dependence import caption_loss, cross_attention_entropy, swap_rows
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.train.finetune import source_preset, source_scale
from fastvlp.train.tasks.caption import CaptionModel, read_caption_records
from fastvlp.train.tasks.weights import load_task_weights


def load_vlp(checkpoint: Path) -> E2EVLP:
    """The checkpoint's E2E-VLP with everything captioning needs, loaded by the fine-tuning loader (which
    reads pre-training and task checkpoints alike)."""
    config = E2EVLPConfig.from_json((checkpoint / "config.json").read_text(encoding="utf-8"))
    model = CaptionModel(config)
    report = load_task_weights(model, checkpoint)
    if report.new or report.mismatched:
        raise ValueError(f"checkpoint: {checkpoint} lacks captioning weights: {(report.new + report.mismatched)[:5]}")
    return model.vlp.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory")
    parser.add_argument("--data", type=Path, required=True, help="a data directory with COCO captions")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--scale", choices=("tiny", "paper"), default=None,
                        help="the image transform; default: the scale the checkpoint records")
    args = parser.parse_args()
    if args.num_images < 2:
        parser.error("--num-images: expected at least 2 (the swap needs another image)")
    scale = args.scale
    if scale is None:
        preset = source_preset(args.checkpoint)  # task.json, preset.json or the run's run.json
        if preset is None:
            parser.error("--scale: the checkpoint does not say which preset it came from; give tiny or paper")
        scale = source_scale(args.checkpoint)  # recorded, or for an older checkpoint its preset's default
    model = load_vlp(args.checkpoint)
    tokenizer = WordPieceTokenizer.load(args.checkpoint / "tokenizer.json")
    records = read_caption_records(args.data, "test").records[: args.num_images]
    dataset = ImageRecordDataset(records, eval_transform(scale))
    samples = [sample for sample in (dataset[i] for i in range(len(dataset))) if isinstance(sample, dict)]
    # Every caption of every image, so that each image is scored on all of its references.
    images, captions = [], []
    for sample in samples:
        for caption in sample["captions"]:
            images.append(sample["image"])
            captions.append(caption)
    nested = nested_tensor_from_images(images)
    encoded = tokenizer.encode_batch(captions)
    ids, mask = encoded.input_ids, encoded.attention_mask
    # Swap each image for the next image (not the next caption, which is usually of the same image).
    swapped = swap_rows([len(sample["captions"]) for sample in samples])
    with torch.inference_mode():
        own = caption_loss(model, nested.tensors, nested.mask, ids, mask)
        other = caption_loss(model, nested.tensors[swapped], nested.mask[swapped], ids, mask)
        entropies = cross_attention_entropy(model, nested.tensors, nested.mask, ids, mask)
    print(f"{len(samples)} test images, {len(captions)} captions")
    print(f"caption loss, own images:     {own:.4f}")
    print(f"caption loss, swapped images: {other:.4f}  (difference {other - own:+.4f}; 0 = the image is not used)")
    for layer, value in enumerate(entropies):
        print(f"decoder layer {layer} cross-attention entropy / log(tokens): {value:.3f}  (1 = uniform)")


if __name__ == "__main__":
    main()
