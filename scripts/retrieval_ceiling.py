"""What retrieval recall does the background tint alone give? For a synthetic data set's Flickr30k split it
prints the expected recall at 1, 5 and 10, both ways, of a score that ranks the candidates of the query's
background tint first and knows nothing else (``fastvlp.eval.retrieval_ceiling``): a model's recall above
it compares more than the tint.

    python scripts/retrieval_ceiling.py --data DATA [--split test]
"""
import argparse
from pathlib import Path

from fastvlp.data.readers.karpathy import read_flickr30k
from fastvlp.eval.retrieval_ceiling import tint_matching_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder holding flickr30k/")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    records = read_flickr30k(Path(args.data) / "flickr30k", splits=[args.split]).records
    recall = tint_matching_recall(records)
    captions = sum(len(r.captions) for r in records)
    print(f"{len(records)} images, {captions} captions ({args.split}); a score that compares the background tints only:")
    print("  ".join(f"{key} {value:.3f}" for key, value in recall.items()))


if __name__ == "__main__":
    main()
