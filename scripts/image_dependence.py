"""Does a checkpoint look at the image? On the captioning test split it prints:

* the caption loss (token cross-entropy, teacher-forced) with each image's own captions, and with every image
  swapped for the next one's: a decoder that reads the image does worse on the swapped images, one that
  has only learnt the captions' language does the same on both;
* the normalised entropy of each decoder layer's cross-attention over the image tokens, per caption token,
  averaged: 1.0 is uniform attention (the decoder sees only the mean of the image tokens), lower is
  attention that picks out some tokens;
* with a pre-training checkpoint (a task's has no MLM head), how well the encoder's MLM head restores the
  colour words of the captions (the synthetic palette's shape colours and background tints, ``--words`` to
  choose others), all of them masked at once: its top-1 accuracy and the mean log-probability of the right
  word, with each image's own captions and with the images swapped. An encoder whose text reads the image
  does better with its own.

It takes a pre-training checkpoint or a captioning fine-tune (``checkpoints/step-N`` directories).

    python scripts/image_dependence.py CHECKPOINT --data DATA [--num-images 64]
"""
import argparse
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.image_records import ImageRecordDataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform
from fastvlp.data.synth.palette import BACKGROUNDS, COLOUR_NAMES
from fastvlp.eval.image_dependence import caption_loss, cross_attention_entropy, masked_word_scores, swap_rows
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


def load_pretrained_vlp(checkpoint: Path) -> Optional[E2EVLP]:
    """The whole E2E-VLP of a pre-training checkpoint, MLM head included; None for a task checkpoint."""
    if (checkpoint / "task.json").is_file():
        return None
    config = E2EVLPConfig.from_json((checkpoint / "config.json").read_text(encoding="utf-8"))
    model = E2EVLP(config)
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory")
    parser.add_argument("--data", type=Path, required=True, help="a data directory with COCO captions")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--words", nargs="+", default=list(COLOUR_NAMES) + list(BACKGROUNDS),
                        help="words to mask for the MLM measure (default: the synthetic shape colours and tints)")
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
        word_ids = [pieces[0] for pieces in (tokenizer.encode(word, add_special_tokens=False) for word in args.words)
                    if len(pieces) == 1]  # a word split into pieces is not one masked token
        pretrained = load_pretrained_vlp(args.checkpoint)
        masked = None if pretrained is None or not word_ids else [
            masked_word_scores(pretrained, images_, pixel_mask_, ids, mask, word_ids, tokenizer.mask_id)
            for images_, pixel_mask_ in ((nested.tensors, nested.mask), (nested.tensors[swapped], nested.mask[swapped]))]
    print(f"{len(samples)} test images, {len(captions)} captions")
    print(f"caption loss, own images:     {own:.4f}")
    print(f"caption loss, swapped images: {other:.4f}  (difference {other - own:+.4f}; 0 = the image is not used)")
    for layer, value in enumerate(entropies):
        print(f"decoder layer {layer} cross-attention entropy / log(tokens): {value:.3f}  (1 = uniform)")
    if masked is None:
        print("masked words: skipped (" + ("a task checkpoint has no MLM head" if pretrained is None
                                           else "none of --words is a single token") + ")")
        return
    (own_accuracy, own_log_prob, scored), (other_accuracy, other_log_prob, _) = masked
    print(f"masked words ({scored} tokens; {len(word_ids)} of the {len(args.words)} words are single tokens), "
          f"restored by the MLM head: own images {own_accuracy:.3f}, swapped images {other_accuracy:.3f}")
    print(f"  mean log-probability of the right word: own images {own_log_prob:.4f}, swapped images "
          f"{other_log_prob:.4f} (difference {own_log_prob - other_log_prob:+.4f}; 0 = the image is not used)")


if __name__ == "__main__":
    main()
