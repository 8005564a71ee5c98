"""How high can CIDEr go on the synthetic captions? For the data of ``fastvlp data synth --num-images N
--seed S`` it prints the CIDEr, on the Karpathy test split, of captioners that know every scene exactly:
one per caption template (each writes a true caption of its template for every image), and one that writes
each image's first reference word for word; next to the most frequent training caption, the demo's
baseline. See ``fastvlp.eval.caption_ceiling``.

    python scripts/caption_ceiling.py [--num-images 512] [--seed 0] [--out FILE.json]
"""
import argparse
import json

from fastvlp.eval.caption_ceiling import caption_ceilings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    result = caption_ceilings(args.num_images, args.seed)
    base = result["most_frequent_caption"]
    print(f"CIDEr on {result['num_test_images']} test images (ratio to the most frequent caption)")
    print(f"{'most frequent caption':28s} {base:6.3f}  1.00x")
    for name, score in sorted(result["templates"].items(), key=lambda kv: kv[1]):
        fallback = result["fallbacks"][name]
        note = f"  ({fallback} images with nothing to say: the most frequent caption)" if fallback else ""
        print(f"{'perfect ' + name + ' captions':28s} {score:6.3f}  {score / base:.2f}x{note}")
    print(f"{'perfect reference captions':28s} {result['reference']:6.3f}  {result['reference'] / base:.2f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
