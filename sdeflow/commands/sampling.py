"""``sdeflow sample | inpaint | denoise``: draw images from a trained checkpoint with any sampler of
:data:`sdeflow.samplers.METHODS`, unconditionally or given masked or noisy images.

argparse only: the sampler flags are those of :class:`sdeflow.samplers.SamplerSettings`
(``--method``, ``--n-steps``, ``--lmbd``, ``--grid``, ``--t-min``, one flag per option of a
registered method, e.g. ``--n-corrector``, and ``--clip`` / ``--threshold P``, which keep x̂₀ in the
range of the checkpoint's data transform), their choices built from the registries, their values
checked by the library: a flag's type parses a number and hands it to the library's check, and
the settings as a whole (built by :func:`sampler_settings_from_args`) are checked by
:meth:`~sdeflow.samplers.SamplerSettings.validate` once the checkpoint's SDE is known. So a method
added with :func:`sdeflow.samplers.register_method` before the parser is built shows up here. The
handlers call :mod:`sdeflow.experiments.images` (load the model, map images to and from model
space, draw samples), :mod:`sdeflow.samplers.conditional` and :mod:`sdeflow.plotting`; each prints one line
saying what it wrote, with the number of network evaluations (NFE). ``sample --out FILE.npz`` keeps
the images themselves (uint8 (N, C, H, W), key "samples") beside their grid FILE.png. Masks and
noise act in the model's space (after the checkpoint's data transform). Bad input: one line on
stderr, exit status 2; a failure at run time (samples that diverge, a disk that refuses the
write): one line, exit status 1.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..cli import CLIError, arg_type
from .models import _checkpoint_arguments, _class_text, class_labels, open_model
from ..utils import check_positive_float, check_positive_int


class SamplingError(RuntimeError):
    """A failure at run time (not bad input): ``sdeflow.cli.main`` prints it in one line, exit status 1."""


# ---- arguments built from the sampler registry and checked by the library -----------------------
def _method_help() -> str:
    from ..samplers import METHODS

    lines = "; ".join(f"{name}: {spec.describe()}" for name, spec in METHODS.items())
    return f"sampler (default: %(default)s). {lines}"


def _add_method_options(parser) -> None:
    """One flag per option of the registered methods: ``--n-corrector`` for option ``n_corrector``,
    or ``--method-snr`` where the command already has a ``--snr`` of its own."""
    from ..samplers import METHODS

    owners: dict[str, list] = {}
    for method, spec in METHODS.items():
        for option, option_spec in spec.options.items():
            owners.setdefault(option, []).append((method, option_spec))
    for option, entries in owners.items():
        first = entries[0][1]
        text = option.replace("_", "-")
        help_text = (f"{first.help + ' ' if first.help else ''}(option of --method "
                     f"{', '.join(method for method, _ in entries)}; default {first.default!r})")
        for flag in (f"--{text}", f"--method-{text}"):
            try:
                parser.add_argument(flag, dest=f"method_option_{option}", default=None,
                                    type=arg_type(first.check, type(first.default), option),
                                    metavar=type(first.default).__name__.upper(), help=help_text)
            except argparse.ArgumentError:  # the command has a flag of that name
                continue
            break
    parser.set_defaults(method_options=tuple(owners))


def _sampler_arguments(p, *, n_steps: int, method: str, clip: bool | None = False, with_lmbd: bool = True) -> None:
    """The flags of :class:`~sdeflow.samplers.SamplerSettings`, defaulting to ``method``, ``n_steps``
    and ``clip`` (None: on where it measured better, :func:`sdeflow.experiments.images.clips_by_default`)."""
    from ..experiments.images import CLIP_MEASURED_WORSE
    from ..samplers import METHODS
    from ..samplers.clipping import check_threshold
    from ..samplers.grids import GRIDS

    p.add_argument("--method", choices=tuple(METHODS), default=method, help=_method_help())
    p.add_argument("--n-steps", type=arg_type(check_positive_int, int, "n_steps"), default=n_steps,
                   help=f"sampler steps (default: {n_steps})")
    p.add_argument("--grid", choices=tuple(GRIDS), default=None,
                   help="time grid: " + "; ".join(f"{name}: {grid.description}" for name, grid in GRIDS.items())
                        + " (default: the method's own)")
    if with_lmbd:
        p.add_argument("--lmbd", type=float, default=None,
                       help="λ: 0 the reverse SDE, 1 the probability-flow ODE, within the method's range "
                            "(default: the method's own)")
    p.add_argument("--t-min", type=float, default=None,
                   help="time at which sampling stops (default: the method's own)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=clip,
                   help="clip every step's prediction x̂₀ into the data's range under the checkpoint's transform "
                        "([-1, 1] centered, [logit α, logit(1-α)] logit, [0, 1] identity), with ε̂ re-derived from it "
                        + ("(default: off)" if clip is False else
                           "(default: on, except for " + ", ".join(CLIP_MEASURED_WORSE) + ", whose samples measured worse "
                           "clipped)" if clip is None else "(default: on)"))
    p.add_argument("--threshold", type=arg_type(check_threshold, float, "threshold"), default=None, metavar="P",
                   help="dynamic thresholding (Imagen) of x̂₀ within that range at percentile P in (0, 100], "
                        "e.g. 99.5: per image, s = max(1, P-th percentile of |x̂₀| scaled to [-1, 1]), clip to "
                        "[-s, s], divide by s (implies the range of --clip)")
    _add_method_options(p)


def sampler_settings_from_args(args, config: dict):
    """The :class:`~sdeflow.samplers.SamplerSettings` the sampler flags of ``args`` give (checked later, by
    ``validate``), with ``clip`` the range of the model configuration ``config``'s data transform
    (:func:`sdeflow.data.transforms.data_range`) under ``--clip`` or ``--threshold P`` (then ``threshold``
    = P). Flags a parser lacks count as not given."""
    from ..data.transforms import data_range
    from ..samplers import SamplerSettings

    threshold = getattr(args, "threshold", None)
    wanted = getattr(args, "clip", False)
    if wanted is None:  # sample and fid: where clipping measured better
        from ..experiments.images import clips_by_default
        wanted = clips_by_default(args.method)
    clip = data_range(config["data"]) if wanted or threshold is not None else None
    options = {option: getattr(args, f"method_option_{option}") for option in getattr(args, "method_options", ())}
    return SamplerSettings(method=args.method, n_steps=args.n_steps, lmbd=getattr(args, "lmbd", None),
                           grid=getattr(args, "grid", None), t_min=getattr(args, "t_min", None),
                           options={option: value for option, value in options.items() if value is not None},
                           clip=clip, threshold=threshold)


def _mask_spec(text: str) -> str:
    from ..samplers.conditional import make_mask

    try:
        make_mask(text, (1, 4, 4))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _conditional_arguments(p) -> None:
    _checkpoint_arguments(p)
    p.add_argument("--out", required=True, metavar="FIG.png", help="the figure to write")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="folder holding the checkpoint's data set (as for `sdeflow train`)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which images to condition on")
    p.add_argument("--n-images", type=arg_type(check_positive_int, int, "n_images"), default=6,
                   help="columns: how many images (default: 6)")
    p.add_argument("--n-samples", type=arg_type(check_positive_int, int, "n_samples"), default=3,
                   help="posterior samples per image (rows; default: 3)")


def register(subparsers) -> None:
    from ..samplers.conditional import INPAINT_SCHEMES
    from ..experiments.images import DEFAULT_SAMPLER

    p = subparsers.add_parser(
        "sample", help="draw a grid of images from a trained checkpoint",
        description="Integrate the generative λ-family (λ = 0: reverse SDE, 1: probability-flow ODE) from "
                    "the prior with a sampler of sdeflow.samplers.METHODS and write the images as a PNG grid.")
    _checkpoint_arguments(p)
    p.add_argument("--n-samples", "--n", dest="n_samples", type=arg_type(check_positive_int, int, "n_samples"),
                   default=64, help="number of images (default: 64)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="FILE.png: the grid of the images; FILE.npz: the images themselves (uint8 (N, C, H, W), key "
                        "'samples') and their grid beside it, FILE.png")
    _sampler_arguments(p, **(DEFAULT_SAMPLER | {"clip": None}))
    p.set_defaults(func=run_sample)

    p = subparsers.add_parser(
        "inpaint", help="fill in masked image regions with a trained model",
        description="Inpaint images with a trained model; the figure shows originals, masked inputs, samples.")
    _conditional_arguments(p)
    p.add_argument("--mask", required=True, type=_mask_spec, metavar="SPEC",
                   help="the MISSING region: left-half, right-half, center, or random:P (each pixel missing w.p. P)")
    p.add_argument("--scheme", choices=INPAINT_SCHEMES, default="guided",
                   help="replacement (Song et al. 2021; biased) or guided (observation-guided score, "
                        "isotropic covariance; default)")
    _sampler_arguments(p, n_steps=500, method="euler")
    p.set_defaults(func=run_inpaint)

    p = subparsers.add_parser(
        "denoise", help="sample clean images given noisy ones (exact posterior)",
        description="Denoise images with a trained model by the reverse SDE (λ = 0) started at the noise "
                    "level of the observation; the figure shows originals, noisy inputs, samples.")
    _conditional_arguments(p)
    level = p.add_mutually_exclusive_group(required=True)
    level.add_argument("--snr", type=arg_type(check_positive_float, float, "snr"),
                       help="signal-to-noise ratio var(x)/σ_n² of the added noise (var over the shown images)")
    level.add_argument("--noise-std", type=arg_type(check_positive_float, float, "noise_std"),
                       help="σ_n of the added noise, in model space")
    _sampler_arguments(p, n_steps=500, method="euler", with_lmbd=False)
    p.set_defaults(func=run_denoise)


# ---- shared plumbing ------------------------------------------------------------------------------
def _check_out(text: str, suffixes=(".png",)) -> Path:
    out = Path(text)
    if out.suffix.lower() not in suffixes:
        raise CLIError(f"--out must name a {' or '.join(suffixes)} file; got {out}")
    if str(out.parent) not in ("", ".") and not out.parent.is_dir():
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _method_text(settings) -> str:
    """The method with its options, e.g. "ancestral (variance learned)"."""
    options = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in settings.options.items())
    return settings.method + (f" ({options})" if options else "")


def _clip_text(settings) -> str:
    """", x̂₀ clipped to [-1, 1]" (or thresholded) when the settings keep x̂₀ in a range, else ""."""
    from ..samplers.clipping import describe_clipping

    text = describe_clipping(settings.clip, settings.threshold)
    return f", {text}" if text else ""


def _describe(settings, nfe: int) -> str:
    return f"{_method_text(settings)}, {settings.n_steps} steps, NFE {nfe}{_clip_text(settings)}"


class _Progress:
    """The sampler's callback in a command: a progress bar over ``total`` steps, the NFE of a run
    (per image) and, at each run's last step, the non-finite check: samples that diverged end
    the command with a :class:`SamplingError`."""

    def __init__(self, args, settings, total: int):
        from tqdm.auto import tqdm

        self.settings, self.nfe = settings, 0
        self.bar = tqdm(total=total, desc=f"sampling ({settings.method})", leave=False,
                        disable=None if args.progress else True)

    def __call__(self, report: dict) -> None:
        import torch

        self.bar.update(1)
        self.nfe = report["nfe"]
        if report["i"] == self.settings.n_steps - 1:
            bad = int((~torch.isfinite(report["x"])).sum())
            if bad:
                raise SamplingError(f"sampling diverged: {bad} non-finite values after {self.settings.n_steps} "
                                    f"{self.settings.method} steps (try more --n-steps or another --method)")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.bar.close()


def _load_split(name: str, root: Path, split: str):
    """uint8 (N, C, H, W) of the image data set ``name`` of the data-set registry."""
    from ..data import get_dataset

    dataset = get_dataset(name)
    if dataset.kind != "image":
        raise CLIError(f"the checkpoint's data set {name!r} is not an image data set")
    return dataset.load(root, split, download=False)


def _load_conditional(args):
    """(model, config, label, clean images in model space (n, C, H, W), generator)."""
    import torch

    from ..data.transforms import check_images, preprocess

    root = Path(args.data_root)
    if not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory")
    model, config, label = open_model(args)
    if config.get("dataset") is None:
        raise CLIError(f"--model {args.model} names no data set to condition on; use a --checkpoint of sdeflow train")
    images = check_images(_load_split(config["dataset"], root, args.split)[: args.n_images], config)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    clean = preprocess(images, config["data"], generator).y.to(args.device)
    return model, config, label, clean, generator


# ---- handlers -------------------------------------------------------------------------------------
def _save_samples(images, path: Path, labels=None) -> None:
    """uint8 images (N, C, H, W) as ``path`` (.npz, key "samples", and "labels" (N,) of a class-conditional
    draw), written atomically."""
    import io

    import numpy as np

    from ..storage.files import atomic_write_bytes

    buffer = io.BytesIO()
    arrays = {"samples": images.cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def run_sample(args) -> int:
    from ..experiments import images as images_lib
    from ..plotting import save_image_grid

    out = _check_out(args.out, (".png", ".npz"))
    model, config, label = open_model(args, every_class=True)
    settings = sampler_settings_from_args(args, config).validate(model.T)
    labels = class_labels(args, model, args.n_samples, per_class=True)  # --class all: one row per class
    n = args.n_samples if labels is None else len(labels)
    with _Progress(args, settings, settings.n_steps * math.ceil(n / 256)) as progress:
        images = images_lib.sample_images(model, config, n, settings, seed=args.seed, device=args.device,
                                          callback=progress, labels=labels,
                                          guidance=args.guidance if labels is not None else 0.0)
    grid = out.with_suffix(".png")
    save_image_grid(images, grid, f"{config['dataset'] or 'image'} samples, {label}"
                                  f"{', one row per class' if labels is not None else ''}, "
                                  f"{settings.n_steps} {_method_text(settings)} steps, λ={settings.lmbd:g}, "
                                  f"NFE {progress.nfe}{_clip_text(settings)}",
                    ncols=None if labels is None else args.n_samples)
    written = str(out)
    if out.suffix.lower() == ".npz":
        _save_samples(images, out, labels)
        written = f"{out} and their grid to {grid}"
    print(f"wrote {n} samples to {written} ({_describe(settings, progress.nfe)}{_class_text(args)})")
    return 0


def _run_conditional(args, observe, draw, title: str, summary: str) -> int:
    """The shared body of inpaint and denoise: load the model and ``--n-images`` clean images,
    ``observe(clean, generator) -> (row label, observation in model space, what draw needs)``, draw
    ``--n-samples`` rows with ``draw(model, what, repeats, settings, generator, callback) -> samples``,
    write the figure (originals, observations, samples) and print one line."""
    from ..data.transforms import postprocess
    from ..plotting import save_image_rows

    out = _check_out(args.out)
    model, config, label, clean, generator = _load_conditional(args)
    settings = sampler_settings_from_args(args, config)
    settings.validate(model.T)  # bad settings are refused before any image is drawn; λ is left to draw
    n, k = clean.shape[0], args.n_samples
    label, observation, what = observe(clean, generator)
    with _Progress(args, settings, settings.n_steps) as progress:
        samples = draw(model, what, k, settings, generator, progress)
    to_uint8 = lambda y: postprocess(y.float(), config["data"])  # noqa: E731
    rows = [("original", to_uint8(clean)), (label, to_uint8(observation))]
    rows += [(f"sample {i + 1}", to_uint8(samples[i * n:(i + 1) * n])) for i in range(k)]
    save_image_rows(rows, out, f"{title}, {config['dataset']} {label}, {settings.n_steps} "
                               f"{_method_text(settings)} steps, NFE {progress.nfe}{_clip_text(settings)}")
    print(f"wrote {out}: {n} images x {k} samples{summary(what)} ({_describe(settings, progress.nfe)}{_class_text(args)})")
    return 0


def run_inpaint(args) -> int:
    import torch

    from ..samplers.conditional import inpaint, make_mask

    def observe(clean, generator):
        mask = make_mask(args.mask, clean.shape, generator=torch.Generator().manual_seed(args.seed))
        mask = mask.to(clean.device)
        # Missing pixels are shown at the model's zero (mid-grey for the logit and centred transforms).
        return "observed", torch.where(mask, clean, torch.zeros_like(clean)), (clean, mask)

    def draw(model, what, k, settings, generator, callback):
        clean, mask = what
        return inpaint(model, clean.repeat(k, 1, 1, 1), mask.repeat(k, 1, 1, 1), args.scheme, settings,
                       generator=generator, callback=callback)

    return _run_conditional(args, observe, draw, f"inpainting ({args.mask} missing), {args.scheme}",
                            lambda what: f", {args.scheme}")


def run_denoise(args) -> int:
    import torch

    from ..samplers.conditional import denoise

    def observe(clean, generator):
        noise_std = args.noise_std if args.noise_std is not None else float(clean.std()) / math.sqrt(args.snr)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        noisy = clean + noise_std * noise
        return "noisy", noisy, (noisy, noise_std)

    def draw(model, what, k, settings, generator, callback):
        noisy, noise_std = what
        return denoise(model, noisy.repeat(k, 1, 1, 1), noise_std, settings, generator=generator, callback=callback)

    level = f"SNR {args.snr:g}" if args.snr is not None else f"σ_n={args.noise_std:.3g}"
    return _run_conditional(args, observe, draw, f"denoising ({level})",
                            lambda what: f", noise_std={what[1]:.4g}")
