"""``sdeflow sample | inpaint | denoise``: draw images from a trained checkpoint with any sampler of
:data:`sdeflow.samplers.METHODS`, unconditionally or given masked or noisy images.

argparse only: the ``--method`` and ``--schedule`` choices, their help and the method-specific
options (``--n-corrector``, ...) are built from the sampler registry, so a method added with
:func:`sdeflow.samplers.register_method` before the parser is built shows up here. The handlers call
:mod:`sdeflow.experiments.images` (load the model, map images to and from model space, draw
samples), :mod:`sdeflow.conditional` and :mod:`sdeflow.plotting`; each prints one line saying what
it wrote, with the number of network evaluations (NFE). Masks and noise act in the model's space
(after the checkpoint's data transform). Bad input: one line on stderr, exit status 2; a failure
at run time (samples that diverge, a disk that refuses the write): one line, exit status 1.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..cli import CLIError, device, lmbd, nonneg_float, nonneg_int, positive_float, positive_int


class SamplingError(RuntimeError):
    """A failure at run time (not bad input): ``sdeflow.cli.main`` prints it in one line, exit status 1."""


# ---- arguments built from the sampler registry --------------------------------------------------
def _method_help() -> str:
    from ..samplers import METHODS

    lines = "; ".join(f"{name}: {spec.describe()}" for name, spec in METHODS.items())
    return f"sampler (default: %(default)s). {lines}"


def _option_type(option: str, spec):
    """argparse type of a method option: the default's type, then the option's own check."""
    kind = type(spec.default)

    def parse(text: str):
        try:
            return spec.check(option, kind(text))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _add_method_options(parser) -> None:
    """One flag per option of the registered methods: ``--n-corrector`` for option ``n_corrector``,
    or ``--method-snr`` where the command already has a ``--snr`` of its own."""
    from ..samplers import METHODS

    owners: dict[str, list] = {}
    for method, spec in METHODS.items():
        for option, option_spec in spec.options.items():
            owners.setdefault(option, []).append((method, option_spec))
    flags = {}
    for option, entries in owners.items():
        methods = [method for method, _ in entries]
        first = entries[0][1]
        dest = f"method_option_{option}"
        text = option.replace("_", "-")
        help_text = (f"{first.help + ' ' if first.help else ''}(option of --method {', '.join(methods)}; "
                     f"default {first.default!r})")
        for flag in (f"--{text}", f"--method-{text}"):
            try:
                parser.add_argument(flag, dest=dest, type=_option_type(option, first), default=None,
                                    metavar=type(first.default).__name__.upper(), help=help_text)
            except argparse.ArgumentError:  # the command has a flag of that name
                continue
            flags[option] = (flag, methods)
            break
    parser.set_defaults(method_option_flags=flags)


def _sampler_arguments(p, *, steps: int, method: str, with_lmbd: bool = True) -> None:
    from ..samplers import METHODS
    from ..schedules import SCHEDULES

    p.add_argument("--method", choices=tuple(METHODS), default=method, help=_method_help())
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="time grid: uniform in t, quadratic, uniform in log-SNR, or Karras et al.'s "
                        "(default: the method's own)")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"sampler steps (default: {steps})")
    if with_lmbd:
        p.add_argument("--lmbd", type=lmbd, default=None,
                       help="λ in [0, 1]: 0 the reverse SDE, 1 the probability-flow ODE (default: the method's own)")
    p.add_argument("--t-min", type=nonneg_float, default=None,
                   help="time at which sampling stops (default: the method's own)")
    _add_method_options(p)


def _checkpoint_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint written by `sdeflow train`: a ckpt-*.pt file, or its run folder (the newest)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not their EMA")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _mask_spec(text: str) -> str:
    from ..conditional import MASKS, make_mask

    try:
        make_mask(text, (1, 4, 4))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(MASKS)} (P in (0, 1)), got {text!r}") from None
    return text


def _conditional_arguments(p) -> None:
    _checkpoint_arguments(p)
    p.add_argument("--out", required=True, metavar="FIG.png", help="the figure to write")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="folder holding the checkpoint's data set (as for `sdeflow train`)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which images to condition on")
    p.add_argument("--n-images", type=positive_int, default=6, help="columns: how many images (default: 6)")
    p.add_argument("--n-samples", type=positive_int, default=3,
                   help="posterior samples per image (rows; default: 3)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw a grid of images from a trained checkpoint",
        description="Integrate the generative λ-family (λ = 0: reverse SDE, 1: probability-flow ODE) from "
                    "the prior with a sampler of sdeflow.samplers.METHODS and write the images as a PNG grid.")
    _checkpoint_arguments(p)
    p.add_argument("--n-samples", "--n", dest="n_samples", type=positive_int, default=64,
                   help="number of images (default: 64)")
    p.add_argument("--out", required=True, metavar="PNG", help="the PNG grid to write")
    _sampler_arguments(p, steps=1000, method="euler")
    p.set_defaults(func=run_sample)

    p = subparsers.add_parser(
        "inpaint", help="fill in masked image regions with a trained model",
        description="Inpaint images with a trained model; the figure shows originals, masked inputs, samples.")
    _conditional_arguments(p)
    p.add_argument("--mask", required=True, type=_mask_spec, metavar="SPEC",
                   help="the MISSING region: left-half, right-half, center, or random:P (each pixel missing w.p. P)")
    p.add_argument("--scheme", choices=("replacement", "guided"), default="guided",
                   help="replacement (Song et al. 2021; biased) or guided (observation-guided score, "
                        "isotropic covariance; default)")
    _sampler_arguments(p, steps=500, method="euler")
    p.set_defaults(func=run_inpaint)

    p = subparsers.add_parser(
        "denoise", help="sample clean images given noisy ones (exact posterior)",
        description="Denoise images with a trained model by the reverse SDE (λ = 0) started at the noise "
                    "level of the observation; the figure shows originals, noisy inputs, samples.")
    _conditional_arguments(p)
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--snr", type=positive_float,
                       help="signal-to-noise ratio var(x)/σ_n² of the added noise (var over the shown images)")
    level.add_argument("--noise-std", type=positive_float, help="σ_n of the added noise, in model space")
    _sampler_arguments(p, steps=500, method="euler", with_lmbd=False)
    p.set_defaults(func=run_denoise)


# ---- shared plumbing ------------------------------------------------------------------------------
def _check_out(text: str) -> Path:
    out = Path(text)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file; got {out}")
    if str(out.parent) not in ("", ".") and not out.parent.is_dir():
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _resolve_checkpoint(text: str) -> Path:
    from ..checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(text)
    except ValueError as err:
        raise CLIError(f"--checkpoint: {err}") from None


def _sampler_settings(args) -> dict:
    """method, schedule, n_steps, t_min, lmbd (if the command has it) and the method's options
    given on the command line; an option of another method is refused, naming its flag."""
    from ..samplers import METHODS

    spec = METHODS[args.method]
    options = {}
    for option, (flag, methods) in args.method_option_flags.items():
        value = getattr(args, f"method_option_{option}")
        if value is None:
            continue
        if args.method not in methods:
            raise CLIError(f"{flag} is an option of --method {', '.join(methods)}, not of --method {args.method}")
        options[option] = value
    settings = dict(method=args.method, schedule=args.schedule, n_steps=args.steps, t_min=args.t_min,
                    options=options)
    lmbd = getattr(args, "lmbd", None)
    if lmbd is not None:
        low, high = spec.lmbd_range
        if not low <= lmbd <= high:
            raise CLIError(f"--lmbd {lmbd:g}: --method {args.method} supports {spec.lmbd}")
    if hasattr(args, "lmbd"):
        settings["lmbd"] = lmbd
    return settings


def _describe(settings: dict, nfe: int) -> str:
    return f"{settings['method']}, {settings['n_steps']} steps, NFE {nfe}"


def _progress(args, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"sampling ({args.method})", leave=False, disable=None if args.progress else True)
    return bar, (lambda state: bar.update(1))


def _check_finite(samples, settings: dict) -> None:
    import torch

    bad = int((~torch.isfinite(samples)).sum())
    if bad:
        raise SamplingError(f"sampling diverged: {bad} non-finite values after {settings['n_steps']} "
                            f"{settings['method']} steps (try more --steps or another --method)")


def _load_split(name: str, root: Path, split: str):
    """uint8 (N, C, H, W) of the image data set ``name`` of the data-set registry."""
    from ..data import get_dataset

    dataset = get_dataset(name)
    if dataset.kind != "image":
        raise CLIError(f"the checkpoint's data set {name!r} is not an image data set")
    return dataset.load(root, split, download=False)


def _load_conditional(args):
    """(model, config, step, clean images in model space (n, C, H, W), generator)."""
    import torch

    from ..checkpoint import load_model
    from ..data.transforms import check_images, postprocess, preprocess
    from ..experiments import images as images_lib

    path = _resolve_checkpoint(args.checkpoint)
    root = Path(args.data_root)
    if not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory")
    model, config, step = load_model(path, use_ema=args.ema, device=args.device)
    images = check_images(_load_split(config["dataset"], root, args.split)[: args.n_images], config)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    clean = preprocess(images, config["data"], generator).y.to(args.device)
    return model, config, step, clean, generator


# ---- handlers -------------------------------------------------------------------------------------
def run_sample(args) -> int:
    from ..checkpoint import load_model
    from ..data.transforms import check_images, postprocess, preprocess
    from ..experiments import images as images_lib
    from ..plotting import save_image_grid

    out = _check_out(args.out)
    settings = _sampler_settings(args)
    path = _resolve_checkpoint(args.checkpoint)
    model, config, step = load_model(path, use_ema=args.ema, device=args.device)
    bar, callback = _progress(args, settings["n_steps"] * math.ceil(args.n_samples / 256))
    with bar:
        images, info = images_lib.sample_images(model, config, args.n_samples, seed=args.seed, device=args.device,
                                                callback=callback, return_info=True, **settings)
    save_image_grid(images, out, f"{config['dataset']} samples, step {step}{' (EMA)' if args.ema else ''}, "
                                 f"{settings['n_steps']} {settings['method']} steps, λ={info['lmbd']:g}, "
                                 f"NFE {info['nfe']}")
    print(f"wrote {args.n_samples} samples to {out} ({_describe(settings, info['nfe'])})")
    return 0


def _run_conditional(args, observe, draw, title: str, summary: str) -> int:
    """The shared body of inpaint and denoise: load the model and ``--n-images`` clean images,
    ``observe(clean, generator) -> (row label, observation in model space, what draw needs)``, draw
    ``--n-samples`` rows with ``draw(model, what, repeats, generator, callback, settings) -> (samples,
    info)``, write the figure (originals, observations, samples) and print one line."""
    from ..checkpoint import load_model
    from ..data.transforms import check_images, postprocess, preprocess
    from ..experiments import images as images_lib
    from ..plotting import save_image_rows

    out = _check_out(args.out)
    settings = _sampler_settings(args)
    model, config, step, clean, generator = _load_conditional(args)
    n, k = clean.shape[0], args.n_samples
    label, observation, what = observe(clean, generator)
    bar, callback = _progress(args, settings["n_steps"])
    with bar:
        samples, info = draw(model, what, k, generator, callback, settings)
    _check_finite(samples, settings)
    to_uint8 = lambda y: postprocess(y.float(), config["data"])  # noqa: E731
    rows = [("original", to_uint8(clean)), (label, to_uint8(observation))]
    rows += [(f"sample {i + 1}", to_uint8(samples[i * n:(i + 1) * n])) for i in range(k)]
    save_image_rows(rows, out, f"{title}, {config['dataset']} step {step}, {settings['n_steps']} "
                               f"{settings['method']} steps, NFE {info['nfe']}")
    print(f"wrote {out}: {n} images x {k} samples{summary(what)} ({_describe(settings, info['nfe'])})")
    return 0


def run_inpaint(args) -> int:
    import torch

    from ..conditional import inpaint, make_mask

    def observe(clean, generator):
        mask = make_mask(args.mask, clean.shape, generator=torch.Generator().manual_seed(args.seed))
        mask = mask.to(clean.device)
        # Missing pixels are shown at the model's zero (mid-grey for the logit and centred transforms).
        return "observed", torch.where(mask, clean, torch.zeros_like(clean)), (clean, mask)

    def draw(model, what, k, generator, callback, settings):
        clean, mask = what
        return inpaint(model, clean.repeat(k, 1, 1, 1), mask.repeat(k, 1, 1, 1), scheme=args.scheme,
                       generator=generator, callback=callback, return_info=True, **settings)

    return _run_conditional(args, observe, draw, f"inpainting ({args.mask} missing), {args.scheme}",
                            lambda what: f", {args.scheme}")


def run_denoise(args) -> int:
    import torch

    from ..conditional import denoise

    def observe(clean, generator):
        noise_std = args.noise_std if args.noise_std is not None else float(clean.std()) / math.sqrt(args.snr)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        noisy = clean + noise_std * noise
        return "noisy", noisy, (noisy, noise_std)

    def draw(model, what, k, generator, callback, settings):
        noisy, noise_std = what
        return denoise(model, noisy.repeat(k, 1, 1, 1), noise_std, generator=generator, callback=callback,
                       return_info=True, **settings)

    level = f"SNR {args.snr:g}" if args.snr is not None else f"σ_n={args.noise_std:.3g}"
    return _run_conditional(args, observe, draw, f"denoising ({level})",
                            lambda what: f", noise_std={what[1]:.4g}")
