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
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.image_records import ImageRecordDataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import eval_transform
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.train.finetune import default_scale
from fastvlp.train.tasks.caption import read_caption_records

# A captioning fine-tune saves the E2E-VLP model under this prefix; a pre-training checkpoint saves it bare.
TASK_MODEL_PREFIX = "vlp."


def load_vlp(checkpoint: Path) -> E2EVLP:
    config = E2EVLPConfig.from_json((checkpoint / "config.json").read_text(encoding="utf-8"))
    state = load_file(checkpoint / "model.safetensors")
    if any(key.startswith(TASK_MODEL_PREFIX) for key in state):
        state = {key[len(TASK_MODEL_PREFIX):]: value for key, value in state.items() if key.startswith(TASK_MODEL_PREFIX)}
    model = E2EVLP(config)
    result = model.load_state_dict(state, strict=False)
    # A caption fine-tune has no MLM, ITM or detection heads; the encoder, decoder and caption head must load.
    needed = [key for key in result.missing_keys if key.split(".")[0] in ("backbone", "encoder", "decoder", "caption_head")]
    if needed:
        raise ValueError(f"checkpoint: {checkpoint} lacks the captioning weights {needed[:5]}")
    return model.eval()


def caption_loss(model, images, pixel_mask, ids, mask) -> float:
    encoded = model.encode_image_only(images, pixel_mask)
    logits = model.caption_logits(encoded, ids[:, :-1], mask[:, :-1])
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100))


def cross_attention_entropy(model, images, pixel_mask, ids, mask) -> list:
    """Per decoder layer: mean over caption tokens, heads and images of the attention entropy over the
    real image tokens, divided by log(number of real image tokens)."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((module, args, kwargs))

    hooks = [layer.multihead_attn.register_forward_hook(record, with_kwargs=True) for layer in model.decoder.layers]
    try:
        encoded = model.encode_image_only(images, pixel_mask)
        model.caption_logits(encoded, ids[:, :-1], mask[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    entropies = []
    for module, args, kwargs in calls:
        query, key, value = args[:3]
        padding = kwargs["key_padding_mask"]
        weights = module(query, key, value, key_padding_mask=padding, need_weights=True, average_attn_weights=False)[1]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)  # [B, heads, T]
        real_tokens = (~padding).sum(-1).clamp_min(2).double()
        normalised = entropy.double() / real_tokens.log()[:, None, None]
        token_mask = mask[:, :-1][:, None, :].expand_as(normalised)
        entropies.append(float(normalised[token_mask].mean()))
    return entropies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory")
    parser.add_argument("--data", type=Path, required=True, help="a data directory with COCO captions")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--scale", choices=("tiny", "paper"), default=None,
                        help="the image transform; default: from a fine-tune's task.json (pre-training checkpoints need it)")
    args = parser.parse_args()
    if args.num_images < 2:
        parser.error("--num-images: expected at least 2 (the swap needs another image)")
    scale = args.scale
    if scale is None:
        task_file = args.checkpoint / "task.json"
        if not task_file.is_file():
            parser.error("--scale: required for a pre-training checkpoint (tiny or paper)")
        scale = default_scale(json.loads(task_file.read_text(encoding="utf-8")).get("preset"))
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
    per_image = [len(sample["captions"]) for sample in samples]
    owner = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(per_image))
    first = torch.cumsum(torch.tensor([0] + per_image[:-1]), 0)
    swapped = first[(owner + 1) % len(samples)]
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
