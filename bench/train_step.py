"""Times one pre-training step and its parts, fastvlp backends against torch/scipy:
`python bench/train_step.py [--preset tiny --batch-size 8 --image-size 128x128 --amp]`.

The code lives in fastvlp.bench.train_step so that an installed fastvlp runs it too (`fastvlp bench train`).
"""
from fastvlp.bench.train_step import main

if __name__ == "__main__":
    raise SystemExit(main())
