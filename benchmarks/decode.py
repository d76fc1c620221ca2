"""Decode speed, time to first token, load time and peak RSS: kogpt vs transformers, one run.

    python benchmarks/decode.py                          # KoGPT2-base shape, fp32 / bf16 / int8
    python benchmarks/decode.py --preset tiny-gptj --dtype bf16 --json out.json
Same flags as `kogpt bench`.
"""

import sys

from kogpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
