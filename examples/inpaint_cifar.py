"""CIFAR-10 inpainting and denoising with a trained image model, as in Sohl-Dickstein et al. (2015):

    sdeflow train --dataset cifar10 --data-root DATA --out runs/cifar ...
    python examples/inpaint_cifar.py --checkpoint runs/cifar --data-root DATA --out-dir figures

writes figures/inpaint_left-half.png (left half missing, observation-guided and replacement) and
figures/denoise_snr1.png (Gaussian noise at SNR 1, exact posterior). Each is a grid: originals,
observations, then posterior samples. All the work is in the ``sdeflow inpaint`` / ``sdeflow
denoise`` commands; this script only calls them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdeflow.cli import main as cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file or run folder of `sdeflow train`")
    parser.add_argument("--out-dir", default="figures")
    parser.add_argument("--data-root", required=True, help="the folder holding cifar-10-batches-py/")
    parser.add_argument("--n-steps", default="500", help="sampler steps")
    parser.add_argument("--method", default="euler", help="the sampler: a name of sdeflow.samplers.METHODS")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--checkpoint", args.checkpoint, "--data-root", args.data_root, "--n-steps", args.n_steps,
              "--method", args.method, "--device", args.device]
    for scheme in ("guided", "replacement"):
        status = cli(["inpaint", *common, "--mask", "left-half", "--scheme", scheme,
                      "--out", str(out / f"inpaint_left-half_{scheme}.png")])
        if status:
            return status
    return cli(["denoise", *common, "--snr", "1", "--out", str(out / "denoise_snr1.png")])


if __name__ == "__main__":
    sys.exit(main())
