"""Times the batched linear-assignment solver against its peers: `python bench/lsap.py [--device cpu|cuda|all]`.

The code lives in fastvlp.bench.lsap so that an installed fastvlp runs it too (`fastvlp bench lsap`).
"""
from fastvlp.bench.lsap import main

if __name__ == "__main__":
    raise SystemExit(main())
