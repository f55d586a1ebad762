"""``sdeflow classifier | fid``: train the classifier whose features give an offline FID, and measure
FID / KID of samples against a data set's images.

argparse only: the handlers call :mod:`sdeflow.metrics` (feature networks, statistics, the
classifier), :mod:`sdeflow.experiments.images` (samples of a checkpoint) and the model loading and
sampler flags of :mod:`sdeflow.commands.sampling`. Each prints one line and, with ``--json``, writes
its figures atomically. A missing extra (torch-fidelity) or weights file, like any bad input, ends
in one line and exit status 2; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..cli import CLIError, device, nonneg_int, positive_float, positive_int
from .models import _checkpoint_arguments, class_labels, open_model
from .sampling import _describe, _Progress, _sampler_arguments, sampler_settings_from_args
from .train import add_data_arguments, load_images


def register(subparsers) -> None:
    from ..metrics import FEATURES
    from ..experiments.images import DEFAULT_SAMPLER

    p = subparsers.add_parser(
        "classifier", help="train the small classifier whose features give an offline FID",
        description="Train sdeflow's LeNet-like classifier (sdeflow.metrics.ClassifierNet) on the labelled training "
                    "split of an image data set, report its accuracy on held-out images (the test split, or the "
                    "last --holdout training images) and write it to --out, for `sdeflow fid --features "
                    "classifier --classifier FILE.pt`.")
    add_data_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE.pt", help="the classifier file to write")
    p.add_argument("--steps", type=positive_int, default=1500, help="optimisation steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate, cosine-decayed (default: %(default)s)")
    p.add_argument("--holdout", type=positive_int, metavar="N",
                   help="hold out the last N training images instead of using the test split (for data with no test split)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the weights, batches and augmentation (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", metavar="FILE", help="also write accuracy, n_train, n_heldout, heldout, steps, seconds as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_classifier)

    p = subparsers.add_parser(
        "fid", help="FID and KID of samples against a data set's images",
        description="Draw --n-samples images from a model (--checkpoint or --model, with any sampler) or read them "
                    "(--samples: an .npz with uint8 'samples' (N, C, H, W), or a folder of PNGs), and compare them "
                    "with the images of --dataset's --split in a feature space: Inception-v3 pool3 as torch-fidelity "
                    "computes it (pip install 'sdeflow[metrics]' and its weights file), or the classifier of "
                    "`sdeflow classifier` (which also reports the share of confidently classified samples and "
                    "their effective number of classes). Prints FID and KID ± its standard error. FID falls "
                    "with N: compare at equal N, and against real held-out images at that N (the floor).")
    _checkpoint_arguments(p)  # --checkpoint | --model, --seed, --no-ema, --device, --no-progress
    # --samples joins that required one-of group: a model or samples already drawn.
    p._mutually_exclusive_groups[-1].add_argument(
        "--samples", metavar="FILE.npz|DIR", help="samples already drawn: an .npz file with a uint8 array 'samples' "
                                                  "(N, C, H, W), as `sdeflow sample --out FILE.npz` writes, or a folder of PNGs")
    add_data_arguments(p, split_default="train")
    p.add_argument("--n-samples", type=positive_int, metavar="N",
                   help="samples to draw (needed with a model) or to read (default: all of --samples)")
    p.add_argument("--n-reference", type=positive_int, metavar="N", help="use the first N images of the split (default: all)")
    p.add_argument("--features", choices=tuple(FEATURES), default="inception",
                   help="feature network: inception (Inception-v3 pool3, 2048-d, as torch-fidelity; needs sdeflow[metrics]) "
                        "or classifier (the hidden layer of --classifier) (default: %(default)s)")
    p.add_argument("--classifier", metavar="FILE.pt", help="--features classifier: the file `sdeflow classifier` wrote")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="--features inception: torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                        "torch.hub's cache, $TORCH_HOME/hub/checkpoints/); never downloaded")
    p.add_argument("--reference-cache", metavar="FILE.npz",
                   help="read the reference images' feature statistics from FILE.npz when it was written for the same "
                        "network and images, else compute and write them there")
    p.add_argument("--batch-size", type=positive_int, default=250, help="images per forward pass (default: %(default)s)")
    p.add_argument("--kid-subsets", type=positive_int, default=100, help="KID's random subsets (default: %(default)s)")
    p.add_argument("--kid-subset-size", type=positive_int, default=1000,
                   help="features per KID subset, capped at the smaller sample (default: %(default)s)")
    p.add_argument("--json", metavar="FILE",
                   help="also write fid, kid, kid_se, n_samples, n_reference, features, ... as JSON")
    _sampler_arguments(p, **(DEFAULT_SAMPLER | {"clip": None}))
    p.set_defaults(func=run_fid)


# ---- shared plumbing --------------------------------------------------------------------------------
def _check_json(path: str | None) -> None:
    if path and not Path(path).parent.is_dir():
        raise CLIError(f"--json {path}: folder {Path(path).parent} does not exist")


def _write_json(path: str | None, summary: dict) -> None:
    from ..storage.files import atomic_write_bytes

    if path:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
        atomic_write_bytes(path, (json.dumps(clean, indent=2) + "\n").encode("utf-8"))


class _Bar:
    """A tqdm progress bar as a callback of sdeflow.metrics (reports {"images", "batch"} or a training step)."""

    def __init__(self, args, total: int, desc: str, unit: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None if args.progress else True)

    def __call__(self, report: dict) -> None:
        if "loss" in report:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{report['loss']:.3f}", refresh=False)
        else:
            self.bar.update(report["batch"])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.bar.close()


# ---- sdeflow classifier ------------------------------------------------------------------------------
def _labelled(args, split: str):
    """(uint8 images (N, C, H, W), labels (N,)) of ``args.dataset``'s ``split``."""
    from ..data import get_dataset

    root = Path(args.data_root)
    if not args.download and not root.is_dir():
        raise CLIError(f"--data-root {root} is not a directory (pass --download to fetch the data set there)")
    try:
        return get_dataset(args.dataset).load(root, split, download=args.download, return_labels=True)
    except TypeError:
        raise CLIError(f"the data set {args.dataset!r} has no labels to train a classifier on") from None


def run_classifier(args) -> int:
    from ..data import get_dataset
    from ..metrics import classifier_accuracy, save_classifier, train_classifier

    out = Path(args.out)
    if str(out.parent) not in ("", ".") and not out.parent.is_dir():
        raise CLIError(f"--out {out}: folder {out.parent} does not exist")
    _check_json(args.json)
    images, labels = _labelled(args, "train")
    if args.holdout:
        if args.holdout >= len(images):
            raise CLIError(f"--holdout {args.holdout} leaves no training images (the split has {len(images)})")
        images, labels, held, held_labels = (images[:-args.holdout], labels[:-args.holdout],
                                             images[-args.holdout:], labels[-args.holdout:])
        heldout = f"the last {args.holdout} training images"
    else:
        try:
            held, held_labels = _labelled(args, "test")
        except FileNotFoundError as err:
            raise CLIError(f"{err}; or hold out the last N training images with --holdout N") from None
        heldout = "the test split"
    start = time.perf_counter()
    with _Bar(args, args.steps, f"training the {args.dataset} classifier", "step") as bar:
        net = train_classifier(images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               flip=get_dataset(args.dataset).mirror_symmetric, seed=args.seed, device=args.device,
                               callback=bar)
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(net, held, held_labels, device=args.device)
    summary = {"dataset": args.dataset, "accuracy": accuracy, "n_train": len(images), "n_heldout": len(held),
               "heldout": heldout, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "seed": args.seed, "seconds": seconds}
    save_classifier(net, out, info=summary)
    print(f"wrote {out}: {args.dataset} classifier, held-out accuracy {accuracy:.2%} on {len(held)} images "
          f"({heldout}; {args.steps} steps on {len(images)} images, {seconds:.0f} s)")
    _write_json(args.json, {**summary, "out": str(out)})
    return 0


# ---- sdeflow fid -------------------------------------------------------------------------------------
def _feature_network(args):
    """The feature network of --features, before anything slow runs (a missing file or extra fails at once)."""
    from ..metrics import load_classifier, make_features
    from ..metrics.inception import WEIGHTS_FILE, default_weights_path

    given = {"classifier": args.classifier, "inception": args.inception_weights}
    for features, flag in (("classifier", "--classifier"), ("inception", "--inception-weights")):
        if given[features] is not None and args.features != features:
            raise CLIError(f"{flag} applies to --features {features}, not --features {args.features}")
    if args.features == "classifier":
        if args.classifier is None:
            raise CLIError("--features classifier needs --classifier FILE.pt (train one with `sdeflow classifier`)")
        if not Path(args.classifier).is_file():
            raise CLIError(f"--classifier {args.classifier} does not exist (train one with `sdeflow classifier`)")
        return load_classifier(args.classifier, device=args.device)
    if args.features == "inception":
        if args.inception_weights is not None and not Path(args.inception_weights).is_file():
            raise CLIError(f"--inception-weights {args.inception_weights} does not exist")
        if args.inception_weights is None and not default_weights_path().is_file():
            raise CLIError(f"Inception-v3 weights not found: put torch-fidelity's {WEIGHTS_FILE} at "
                           f"{default_weights_path()} or pass --inception-weights PATH (sdeflow never downloads)")
        return make_features("inception", weights_path=args.inception_weights).to(args.device)
    return make_features(args.features).to(args.device)


def _samples(args):
    """(uint8 samples (N, C, H, W), what they are, sampler figures for the summary)."""
    if args.samples is not None:
        from ..metrics import load_samples

        samples = load_samples(args.samples)
        if args.n_samples is not None:
            if args.n_samples > len(samples):
                raise CLIError(f"--n-samples {args.n_samples}: {args.samples} holds only {len(samples)} samples")
            samples = samples[:args.n_samples]
        return samples, str(args.samples), {}
    from ..experiments import images as images_lib

    if args.n_samples is None:
        raise CLIError("--n-samples N is needed to draw samples from a model")
    model, config, label = open_model(args, every_class=True)
    if config.get("dataset") not in (None, args.dataset):
        raise CLIError(f"the model was trained on {config.get('dataset')!r}, not --dataset {args.dataset}")
    settings = sampler_settings_from_args(args, config).validate(model.T)
    labels = class_labels(args, model, args.n_samples, per_class=False)  # --class all: the classes in turn
    with _Progress(args, settings, settings.n_steps * math.ceil(args.n_samples / 256)) as progress:
        samples = images_lib.sample_images(model, config, args.n_samples, settings, seed=args.seed,
                                           device=args.device, callback=progress, labels=labels,
                                           guidance=args.guidance if labels is not None else 0.0)
    source = f"{args.model or args.checkpoint} ({label})"
    return samples, source, {"sampler": _describe(settings, progress.nfe), "nfe": progress.nfe}


def run_fid(args) -> int:
    import torch

    from ..metrics import image_metrics, reference_statistics

    _check_json(args.json)
    if args.reference_cache and not Path(args.reference_cache).parent.is_dir():
        raise CLIError(f"--reference-cache {args.reference_cache}: folder {Path(args.reference_cache).parent} does not exist")
    net = _feature_network(args)
    reference = load_images(args, args.split)[:args.n_reference]
    samples, source, sampler = _samples(args)
    if samples.shape[1:] != reference.shape[1:]:
        raise CLIError(f"the samples are {tuple(samples.shape[1:])} images, the {args.dataset} images "
                       f"{tuple(reference.shape[1:])}")
    # One generator each, so that figures from cached reference statistics equal those computed afresh.
    with _Bar(args, len(reference), f"{args.features} features of the reference", "img") as bar:
        stats = reference_statistics(net, reference, cache=args.reference_cache, batch_size=args.batch_size,
                                     device=args.device, generator=torch.Generator().manual_seed(args.seed),
                                     callback=bar)
    with _Bar(args, len(samples), f"{args.features} features of the samples", "img") as bar:
        result = image_metrics(net, samples, stats, batch_size=args.batch_size, device=args.device,
                               n_subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                               generator=torch.Generator().manual_seed(args.seed), callback=bar)
    extra = ""
    if "effective_classes" in result:
        extra = (f"; {result['confident_share']:.1%} classified with confidence > 0.9, "
                 f"{result['effective_classes']:.2f} effective classes")
    if sampler:
        extra += f"; {sampler['sampler']}"
    print(f"FID {result['fid']:.3f}, KID {result['kid']:.5f} ± {result['kid_se']:.5f} ({result['n_samples']} samples "
          f"vs {result['n_reference']} {args.dataset} {args.split} images, {result['features']} features{extra})")
    _write_json(args.json, {**result, **sampler, "source": source, "dataset": args.dataset, "split": args.split,
                            "seed": args.seed})
    return 0
