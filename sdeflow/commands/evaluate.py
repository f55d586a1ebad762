"""``sdeflow eval``: bits/dim of an image data set under a trained checkpoint.

Only parses arguments and calls :mod:`sdeflow.likelihood.evaluation` (never the training code).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..cli import CLIError, add_config_arguments, config_from_args, device, nonneg_int, positive_float, positive_int
from .models import add_model_arguments, open_model
from .train import add_data_arguments, load_images


def register(subparsers) -> None:
    from ..likelihood.evaluation import LikelihoodSettings

    p = subparsers.add_parser(
        "eval", help="bits/dim of a data set under a trained checkpoint",
        description="Estimate bits/dim of every image of a split: the ELBO (unbiased; default: time drawn from "
                    "a proposal fitted to the model on a pilot batch, 4 slices, lowest variance) or, with "
                    "--bound ode, the probability-flow ODE likelihood. Prints mean ± standard error and the "
                    "estimator used, and warns on stderr when a few images carry most of the variance "
                    "(then the standard error itself is unreliable). "
                    "Under torchrun the images are split across processes.")
    add_model_arguments(p)
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="use the raw trained weights instead of their EMA (the default)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    add_data_arguments(p, split_default="test")
    add_config_arguments(p, LikelihoodSettings, LikelihoodSettings())
    p.add_argument("--variance-images", type=positive_int, default=64,
                   help="--variance analytic: training images its Γ = E‖ε̂‖²/D is estimated on (default: 64)")
    p.add_argument("--variance-json", metavar="FILE",
                   help="--variance analytic: read the estimate from FILE if it exists, else write it there")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch per process (default: 64)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of the split")
    p.add_argument("--json", metavar="FILE",
                   help="also write bpd, bpd_se, n_images, seconds, estimator, tail_share, tail_count, kurtosis, "
                        "heavy_tailed (nfe with --bound ode) as JSON")
    p.add_argument("--per-image", action="store_true",
                   help="also write each image's bits/dim to the --json file (bpd_per_image), e.g. to compare two "
                        "models on the same images with a paired standard error")
    p.add_argument("--class-conditional", action="store_true",
                   help="a class-conditional model: bits/dim of p(x | y) at the images' true labels and of p(x) "
                        "(the null class) on the same images, and their paired difference, the mutual "
                        "information I(x; y) per dimension")
    p.add_argument("--every-class", action="store_true",
                   help="with --class-conditional: also score every image under every class (C + 1 evaluations "
                        "instead of 2): the bits/dim of the mixture of the classes, I(x; y) against it, and the "
                        "diffusion classifier's accuracy")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=run_eval)
    _register_classify(subparsers)


def _register_classify(subparsers) -> None:
    c = subparsers.add_parser(
        "classify", help="the diffusion classifier of a class-conditional checkpoint: accuracy and calibration",
        description="Classify every image of a split by Bayes from the ELBO of each class (the same draws for "
                    "every class, one time plan fitted to the differences between classes) and report the "
                    "accuracy, the mean negative log-likelihood of the true labels, the expected calibration "
                    "error and the cost per image. With --rounds R, each image drops after every round the "
                    "classes clearly below its leader (adaptive allocation).")
    add_model_arguments(c)
    c.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw trained weights")
    c.add_argument("--seed", type=nonneg_int, default=0, help="seed of every random choice (default: 0)")
    c.add_argument("--device", type=device, default="cpu", help="cpu or cuda (default: cpu)")
    add_data_arguments(c, split_default="test")
    c.add_argument("--n-slices", type=positive_int, default=4,
                   help="ELBO time draws per image and class in each round (default: 4)")
    c.add_argument("--rounds", type=positive_int, default=1,
                   help="rounds of --n-slices draws; after each, an image drops the classes whose paired difference "
                        "to its leader lies --z standard errors below zero (default: 1, no dropping)")
    c.add_argument("--z", type=positive_float, default=3.0,
                   help="standard errors below the leader at which --rounds drops a class (default: 3)")
    c.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: 16)")
    c.add_argument("--limit", type=positive_int, help="classify only the first N images of the split")
    c.add_argument("--json", metavar="FILE", help="also write the figures and every image's prediction as JSON")
    c.set_defaults(func=run_classify)


def run_eval(args) -> int:
    from ..storage.files import atomic_write_bytes
    from ..engine.distributed import init_distributed
    from ..likelihood.evaluation import LikelihoodSettings, evaluate_bpd
    from ..nets import has_variance_head

    settings = config_from_args(LikelihoodSettings, args)
    if args.per_image and not args.json:
        raise CLIError("--per-image writes to the --json file: give --json FILE too")
    if args.json and not Path(args.json).parent.is_dir():
        raise CLIError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    if args.every_class and not args.class_conditional:
        raise CLIError("--every-class goes with --class-conditional")
    rank, world, dev = init_distributed(args.device)
    args.device = dev
    model, config, label = open_model(args)
    settings.validate(model.T)
    if config.get("dataset") not in (None, args.dataset):
        raise CLIError(f"the checkpoint was trained on {config.get('dataset')!r}, not --dataset {args.dataset}")
    if settings.bound == "discrete" and settings.variance == "learned" and not has_variance_head(model):
        raise CLIError("--variance learned needs a model with a variance head: train it with sdeflow train "
                       "--learned-variance")
    if settings.bound == "discrete" and settings.variance == "analytic":
        settings = dataclasses.replace(settings, variance=_analytic_variance(args, model, config, settings.chain_steps))
    if args.class_conditional:
        return _run_conditional(args, model, config, settings, rank)
    images = load_images(args, args.split)
    if args.limit:
        images = images[:args.limit]
    result = evaluate_bpd(model, images, config, settings, batch_size=args.batch_size, seed=args.seed, device=dev,
                          progress=args.progress)
    if rank != 0:
        return 0
    counted = "nfe" in result  # the ODE and the discrete bound count their network evaluations
    keys = ("bpd", "bpd_se", "n_images", "seconds", "estimator", "tail_share", "tail_count", "kurtosis",
            "heavy_tailed")
    summary = {key: result[key] for key in keys + (("nfe",) if counted else ())}
    summary = {key: None if value != value else value for key, value in summary.items()}  # NaN: JSON's null
    summary.update({"model": args.model or str(args.checkpoint), "weights": label, "split": args.split,
                    "seed": args.seed})
    if args.per_image:
        summary["bpd_per_image"] = result["bpd_per_image"].tolist()
    extra = f", mean NFE {result['nfe']:.0f}" if counted else ""
    print(f"{args.split} bits/dim: {result['bpd']:.4f} ± {result['bpd_se']:.4f} "
          f"({result['n_images']} images, {result['estimator']}, {result['seconds']:.1f} s{extra})")
    if result["heavy_tailed"]:
        print(heavy_tail_warning(result, slices=settings.bound == "elbo"), file=sys.stderr)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return 0


def _analytic_variance(args, model, config: dict, chain_steps: int):
    """The Analytic-DPM variances: from --variance-json if that file exists, else estimated on the first
    --variance-images of the training split (and written to --variance-json when given)."""
    from ..storage.files import atomic_write_bytes
    from ..discrete import AnalyticVariance
    from ..likelihood.evaluation import analytic_variance

    if args.variance_json and Path(args.variance_json).is_file():
        try:
            return AnalyticVariance.from_state(json.loads(Path(args.variance_json).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CLIError(f"--variance-json {args.variance_json} is not a JSON file ({err})") from None
    train = load_images(args, "train")[:args.variance_images]
    value = analytic_variance(model, train, config, chain_steps, seed=args.seed, batch_size=args.batch_size)
    if args.variance_json:
        atomic_write_bytes(args.variance_json, (json.dumps(value.to_state()) + "\n").encode("utf-8"))
    return value


def heavy_tail_warning(result: dict, slices: bool = True) -> str:
    """The one-line warning for a result of :func:`sdeflow.likelihood.evaluation.evaluate_bpd` whose per-image
    bits/dim are heavy-tailed (its "heavy_tailed"); ``slices``: the estimator is the ELBO, whose own noise
    more --n-slices average."""
    hint = "; more --n-slices average the estimator's own noise" if slices else ""
    return (f"sdeflow eval: warning: the standard error ± {result['bpd_se']:.4f} is unreliable: the per-image "
            f"bits/dim are heavy-tailed, {result['tail_count']} of {result['n_images']} images carry "
            f"{result['tail_share']:.0%} of their variance (kurtosis {result['kurtosis']:.0f}; a Gaussian's is 3)"
            f"{hint}")


def _labelled(args, model):
    """(images, labels) of the split, limited; CLIError for an unconditional model."""
    if not getattr(model.net, "num_classes", 0):
        raise CLIError("the model is unconditional: train it with sdeflow train --class-conditional")
    images, labels = load_images(args, args.split, labels=True)
    return (images[:args.limit], labels[:args.limit]) if args.limit else (images, labels)


def _write_json(path, summary: dict) -> None:
    from ..storage.files import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))


def _run_conditional(args, model, config, settings, rank: int) -> int:
    from ..likelihood.classifier import conditional_bpd

    images, labels = _labelled(args, model)
    result = conditional_bpd(model, images, labels, config, settings, batch_size=args.batch_size, seed=args.seed,
                             device=args.device, every_class=args.every_class)
    if rank != 0:
        return 0
    (cond, cond_se), (uncond, uncond_se), (info, info_se) = (result[k] for k in ("conditional", "unconditional",
                                                                                 "information"))
    print(f"{args.split} bits/dim of p(x | y): {cond:.4f} ± {cond_se:.4f}; of p(x): {uncond:.4f} ± {uncond_se:.4f} "
          f"({result['n_images']} images, {result['estimator']})")
    print(f"I(x; y) per dimension: {info:.5f} ± {info_se:.5f} bits (paired; at most {result['information_bound']:.5f} "
          f"if the null class is the mixture of the classes)")
    summary = {"bpd_conditional": cond, "bpd_conditional_se": cond_se, "bpd_unconditional": uncond,
               "bpd_unconditional_se": uncond_se, "information": info, "information_se": info_se,
               "information_bound": result["information_bound"], "n_images": result["n_images"],
               "estimator": result["estimator"], "split": args.split, "seed": args.seed}
    if args.every_class:
        (mix, mix_se), (mix_info, mix_info_se) = result["mixture"], result["mixture_information"]
        print(f"bits/dim of the mixture of the classes: {mix:.4f} ± {mix_se:.4f}; I(x; y) against it: {mix_info:.5f} "
              f"± {mix_info_se:.5f} bits per dimension; diffusion classifier accuracy {result['accuracy']:.2%}")
        summary.update(bpd_mixture=mix, bpd_mixture_se=mix_se, mixture_information=mix_info,
                       mixture_information_se=mix_info_se, accuracy=result["accuracy"])
    if args.json:
        _write_json(args.json, summary)
    return 0


def run_classify(args) -> int:
    from ..likelihood.classifier import evaluate_classifier

    if args.json and not Path(args.json).parent.is_dir():
        raise CLIError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    model, config, label = open_model(args)
    if config.get("dataset") not in (None, args.dataset):
        raise CLIError(f"the checkpoint was trained on {config.get('dataset')!r}, not --dataset {args.dataset}")
    images, labels = _labelled(args, model)
    result = evaluate_classifier(model, images, labels, config, n_slices=args.n_slices, rounds=args.rounds, z=args.z,
                                 batch_size=args.batch_size, seed=args.seed)
    rounds = f"up to {args.rounds} rounds of {args.n_slices}" if args.rounds > 1 else f"{args.n_slices}"
    print(f"{args.split}: accuracy {result['accuracy']:.2%}, NLL {result['nll']:.4f} nats, ECE {result['ece']:.4f} "
          f"({result['n_images']} images, {rounds} slices per class, {result['evaluations_per_image']:.0f} network "
          f"evaluations and {result['seconds_per_image']:.2f} s per image; {label})")
    if args.json:
        keys = ("accuracy", "nll", "ece", "seconds_per_image", "evaluations_per_image", "n_images")
        _write_json(args.json, {key: result[key] for key in keys}
                    | {"predictions": result["predictions"].tolist(), "labels": labels.tolist(),
                       "n_slices": args.n_slices, "rounds": args.rounds, "z": args.z, "split": args.split,
                       "seed": args.seed})
    return 0
