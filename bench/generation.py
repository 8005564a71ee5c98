"""Times caption generation and VQA inference, attention backend fastvlp against torch:
`python bench/generation.py [--preset tiny --batch-size 8 --max-length 20 --num-beams 4]`.

The code lives in fastvlp.bench.generation so that an installed fastvlp runs it too.
"""
from fastvlp.bench.generation import main

if __name__ == "__main__":
    raise SystemExit(main())
