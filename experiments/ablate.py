"""Entry point of the int4 vs int8 ablation (same as the `lowbit ablate` command).

    python experiments/ablate.py --config configs/shakespeare_quick.py
"""

import sys

from lowbit.cli import main

if __name__ == "__main__":
  sys.exit(main(["ablate", *sys.argv[1:]]))
