"""``sdeflow inpaint | denoise``: conditional samples from a trained image model, drawn as the
figures of Sohl-Dickstein et al. (2015): a row of originals, a row of observations (masked or
noisy) and rows of posterior samples.

The handlers load the model with :func:`sdeflow.training.load_model` (the checkpoints ``sdeflow
train`` writes), read images with :mod:`sdeflow.data.images`, and call
:func:`sdeflow.conditional.inpaint` / :func:`sdeflow.conditional.denoise`. Masks and noise act in
the model's space (after the checkpoint's data transform). Bad input: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..cli import CLIError, positive_float, positive_int






def _mask_spec(text: str) -> str:
    from ..conditional import MASKS, make_mask

    try:
        make_mask(text, (1, 4, 4))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MASKS)} (P in (0, 1)), got {text!r}") from None
    return text


def _common_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint written by `sdeflow train` (a ckpt-*.pt file or its run folder: the latest)")
    p.add_argument("--out", required=True, metavar="FIG.png", help="the figure to write")
    p.add_argument("--data-root", default="/work/shared/data/cifar10-subset", metavar="DIR",
                   help="folder holding the checkpoint's data set (cifar-10-batches-py/ or the MNIST files)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which images to condition on")
    p.add_argument("--n-images", type=positive_int, default=6, help="columns: how many images (default 6)")
    p.add_argument("--n-samples", type=positive_int, default=3, help="posterior samples per image (rows; default 3)")
    p.add_argument("--steps", type=positive_int, default=500, help="sampler steps (default 500)")
    p.add_argument("--sampler", default="euler", help="sdeflow.sample method (default euler)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def register(subparsers) -> None:
    p = subparsers.add_parser("inpaint", help="fill in masked image regions with a trained model",
                              description="Inpaint images with a trained model: originals, masked inputs, samples.")
    _common_arguments(p)
    p.add_argument("--mask", required=True, type=_mask_spec, metavar="SPEC",
                   help="the MISSING region: left-half, right-half, center, or random:P (each pixel missing w.p. P)")
    p.add_argument("--method", choices=("replacement", "guided"), default="guided",
                   help="replacement (Song et al. 2021; biased) or guided (observation-guided score, "
                        "isotropic covariance; default)")
    p.set_defaults(func=run_inpaint)

    p = subparsers.add_parser("denoise", help="sample clean images given noisy ones (exact posterior)",
                              description="Denoise images with a trained model: originals, noisy inputs, samples.")
    _common_arguments(p)
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--snr", type=positive_float,
                       help="signal-to-noise ratio var(x)/σ_n² of the added noise (var over the shown images)")
    level.add_argument("--noise-std", type=positive_float, help="σ_n of the added noise, in model space")
    p.set_defaults(func=run_denoise)


# ---- shared plumbing ---------------------------------------------------------------------------
def _check_out(text: str) -> Path:
    out = Path(text)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file; got {out}")
    if str(out.parent) not in ("", ".") and not out.parent.is_dir():
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _load(args):
    """(model, config, step, clean images in model space (n, C, H, W), generator)."""
    import torch

    from .. import checkpoint as ckpt
    from .. import training
    from ..data import images as data_images

    path = Path(args.checkpoint)
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise CLIError(f"--checkpoint {path} is a folder with no ckpt-*.pt file")
        path = latest
    if not path.is_file():
        raise CLIError(f"--checkpoint {path} does not exist")
    model, config, step = training.load_model(path, use_ema=args.ema, device=args.device)
    root = Path(args.data_root)
    if not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory")
    loader = data_images.load_cifar10 if config["dataset"] == "cifar10" else data_images.load_mnist
    images = training.check_images(loader(root, args.split)[: args.n_images], config)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    clean = training.preprocess(images, config["data"], generator).y.to(args.device)
    return model, config, step, clean, generator


def _progress(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sampling", leave=False, disable=None)
    return bar, (lambda state: bar.update(1))


def _figure(rows: list[tuple[str, "torch.Tensor"]], title: str, out: Path) -> None:
    """Rows of uint8 images (n, C, H, W), each labelled, one figure, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import save_figure

    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            image = images[c].permute(1, 2, 0).cpu().numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, dpi=120)


# ---- handlers ----------------------------------------------------------------------------------
def run_inpaint(args) -> int:
    import torch

    from .. import training
    from ..conditional import inpaint, make_mask

    out = _check_out(args.out)
    model, config, step, clean, generator = _load(args)
    n, k = clean.shape[0], args.n_samples
    mask = make_mask(args.mask, clean.shape, generator=torch.Generator().manual_seed(args.seed)).to(clean.device)
    bar, callback = _progress(args.steps)
    with bar:
        samples = inpaint(model, clean.repeat(k, 1, 1, 1), mask.repeat(k, 1, 1, 1), method=args.method,
                          n_steps=args.steps, sampler=args.sampler, generator=generator, callback=callback)
    to_uint8 = lambda y: training.postprocess(y.float(), config["data"])  # noqa: E731
    # Missing pixels are shown at the model's zero (mid-grey for the logit and centred transforms).
    rows = [("original", to_uint8(clean)), ("observed", to_uint8(torch.where(mask, clean, torch.zeros_like(clean))))]
    rows += [(f"sample {i + 1}", to_uint8(samples[i * n:(i + 1) * n])) for i in range(k)]
    _figure(rows, f"inpainting ({args.mask} missing), {config['dataset']} step {step}, {args.method}, "
                  f"{args.steps} {args.sampler} steps", out)
    print(f"wrote {out}: {n} images x {k} samples")
    return 0


def run_denoise(args) -> int:
    import torch

    from .. import training
    from ..conditional import denoise

    out = _check_out(args.out)
    model, config, step, clean, generator = _load(args)
    n, k = clean.shape[0], args.n_samples
    noise_std = args.noise_std if args.noise_std is not None else float(clean.std()) / math.sqrt(args.snr)
    noisy = clean + noise_std * torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    bar, callback = _progress(args.steps)
    with bar:
        samples = denoise(model, noisy.repeat(k, 1, 1, 1), noise_std, n_steps=args.steps, sampler=args.sampler,
                          generator=generator, callback=callback)
    to_uint8 = lambda y: training.postprocess(y.float(), config["data"])  # noqa: E731
    rows = [("original", to_uint8(clean)), ("noisy", to_uint8(noisy))]
    rows += [(f"sample {i + 1}", to_uint8(samples[i * n:(i + 1) * n])) for i in range(k)]
    level = f"SNR {args.snr:g}, " if args.snr is not None else ""
    _figure(rows, f"denoising ({level}σ_n={noise_std:.3g}), {config['dataset']} step {step}, "
                  f"{args.steps} {args.sampler} steps", out)
    print(f"wrote {out}: {n} images x {k} samples, noise_std={noise_std:.4g}")
    return 0
