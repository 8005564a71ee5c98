"""python -m fastvlp.data.synth --out DIR [--num-images N] [--seed S]"""

import sys

from fastvlp.data.synth.cli import main

sys.exit(main())
