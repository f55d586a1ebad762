"""The Swissroll example: train a plug-in reverse SDE on 2-D toy data, measure it, draw it.

    python examples/swissroll.py --out runs/swissroll            # same as: sdeflow swissroll ...
    python examples/swissroll.py --dataset checkerboard --lmbd 0.5

All the work is in :func:`sdeflow.experiments.toy.run_toy`; this script is the ``sdeflow swissroll`` command.
"""

import sys

from sdeflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["swissroll", *sys.argv[1:]]))
