"""``sdeflow swissroll``: train, measure and draw the 2-D toy example (see :mod:`sdeflow.experiments.toy`).

Only parses arguments: the training flags come from :class:`sdeflow.training.TrainConfig` (with the
toy's defaults), the SDE from :data:`sdeflow.sdes.linear.SDES`, the data sets from :data:`sdeflow.data.DATASETS`.
"""

from __future__ import annotations


from ..cli import (add_config_arguments, add_sde_arguments, device, lmbd, positive_float,
                   positive_int, sde_from_args)

DESCRIPTION = """Train a plug-in reverse SDE (small MLP) on a 2-D toy data set, then write into --out:
samples.png (data beside samples for each λ), trajectories_lmbd<λ>.png (particle paths from the prior
to the data and snapshots of the marginals), training.png (loss and running ELBO against step),
metrics.json (test ELBO, ODE log-likelihood, sliced Wasserstein distances, timings), metrics.jsonl and
checkpoints (--resume continues an interrupted run)."""


def add_arguments(parser) -> None:
    """The example's flags; shared by the subcommand and ``examples/swissroll.py``."""
    from ..data import DATASETS
    from ..training import TrainConfig
    from ..engine import HOOKS
    from ..model import PARAMETERIZATIONS
    from ..experiments.toy import ToyConfig, ToyEvalConfig, toy_train_config

    defaults = ToyConfig()
    toy_sets = tuple(name for name, entry in DATASETS.items() if entry.kind == "toy")
    parser.add_argument("--dataset", default=defaults.dataset, choices=toy_sets, metavar="NAME",
                        help=f"toy data set: {', '.join(toy_sets)} (default: %(default)s)")
    parser.add_argument("--out", default="runs/swissroll", metavar="DIR",
                        help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--device", type=device, default=defaults.device, help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch; the 2-D network is too small to gain from more, and one "
                             "thread never stalls on a busy machine (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--hook", action="append", default=[], choices=tuple(HOOKS), metavar="NAME",
                        help=f"extra logging hook from sdeflow.engine.HOOKS ({', '.join(HOOKS)}); repeatable")
    net = parser.add_argument_group("network (sdeflow.nets.mlp)")
    net.add_argument("--hidden", type=positive_int, default=defaults.net["hidden"], help="MLP width (default: %(default)s)")
    net.add_argument("--blocks", type=positive_int, default=defaults.net["n_blocks"],
                     help="MLP residual blocks (default: %(default)s)")
    net.add_argument("--fourier-features", type=int, default=defaults.net["fourier_features"],
                     help="random Fourier features of the input (0: none) (default: %(default)s)")
    net.add_argument("--fourier-scale", type=positive_float, default=defaults.net["fourier_scale"],
                     help="scale of the Fourier features' frequencies (default: %(default)s)")
    net.add_argument("--parameterization", choices=PARAMETERIZATIONS, default=defaults.parameterization,
                     help="what the network predicts (default: %(default)s)")
    add_sde_arguments(parser)
    add_config_arguments(parser, TrainConfig, toy_train_config(), skip=("flip",))
    ev = parser.add_argument_group("evaluation")
    ev_defaults = ToyEvalConfig()
    ev.add_argument("--lmbd", type=lmbd, nargs="+", default=[], metavar="λ",
                    help="extra λ values to sample besides 0 (reverse SDE) and 1 (ODE), e.g. --lmbd 0.5 0.9")
    ev.add_argument("--eval-steps", "--sample-steps", dest="eval_n_steps", type=positive_int,
                    default=ev_defaults.n_steps,
                    help="Euler steps of the evaluation's samples and trajectories (default: %(default)s)")
    ev.add_argument("--n-samples", type=positive_int, default=ev_defaults.n_samples,
                    help="samples per λ for the figure and the sliced Wasserstein distance (default: %(default)s)")
    ev.add_argument("--n-trajectories", type=positive_int, default=ev_defaults.n_trajectories,
                    help="particle paths per λ (default: %(default)s)")
    ev.add_argument("--n-likelihood", type=positive_int, default=ev_defaults.n_likelihood,
                    help="test points for the ELBO and the ODE log-likelihood (default: %(default)s)")
    ev.add_argument("--n-slices", type=positive_int, default=ev_defaults.n_slices,
                    help="time draws per test point of the ELBO (default: %(default)s)")


def toy_config_from_args(args):
    """The :class:`~sdeflow.experiments.toy.ToyConfig` the parsed ``args`` ask for (validated)."""
    from ..cli import config_from_args as dataclass_from_args
    from ..training import TrainConfig
    from ..experiments.toy import ToyConfig, ToyEvalConfig

    train = dataclass_from_args(TrainConfig, args, grad_clip=args.grad_clip or None)
    evaluation = ToyEvalConfig(lmbds=tuple(sorted({0.0, 1.0, *args.lmbd})), n_steps=args.eval_n_steps,
                               n_samples=args.n_samples, n_trajectories=args.n_trajectories,
                               n_likelihood=args.n_likelihood, n_slices=args.n_slices)
    net = {"name": "mlp", "dim": 2, "hidden": args.hidden, "n_blocks": args.blocks,
           "fourier_features": args.fourier_features, "fourier_scale": args.fourier_scale}
    return ToyConfig(dataset=args.dataset, sde=sde_from_args(args), net=net, parameterization=args.parameterization,
                     train=train, eval=evaluation, device=args.device).validate()


def summary(metrics: dict, out_dir: str) -> str:
    """A short human summary of the metrics."""
    cfg = metrics["config"]
    steps = metrics.get("steps", cfg["steps"])  # the steps trained: fewer if a time budget ended the run
    lines = [f"{cfg['dataset']}: trained {steps} steps in {metrics['train_seconds']:.0f} s "
             f"(evaluation {metrics['eval_seconds']:.0f} s)",
             f"  test ELBO        {metrics['elbo_nats']:8.3f} ± {metrics['elbo_se']:.3f} nats/point",
             f"  ODE log-lik.     {metrics['ode_logp_nats']:8.3f} ± {metrics['ode_logp_se']:.3f} nats/point "
             f"({metrics['ode_nfe']:.0f} network evaluations)"]
    if "true_logp_nats" in metrics:
        lines.append(f"  true log-density {metrics['true_logp_nats']:8.3f} nats/point "
                     f"(ELBO gap {metrics['elbo_gap_nats']:.3f} ± {metrics['elbo_gap_se']:.3f}, "
                     f"ODE gap {metrics['ode_gap_nats']:.3f} ± {metrics['ode_gap_se']:.3f})")
    swd = [f"λ={key[len('swd_lmbd'):]}: {value:.4f}" for key, value in metrics.items()
           if key.startswith("swd_lmbd")]
    lines.append(f"  sliced W1 to data {', '.join(swd)}  (floor {metrics['swd_floor']:.4f}: two data sets)")
    lines.append(f"  wrote samples.png, trajectories_lmbd*.png, training.png, metrics.json to {out_dir}")
    return "\n".join(lines)


def handler(args) -> int:
    import torch

    from ..engine import ProgressBar, make_hook
    from ..experiments.toy import run_toy

    config = toy_config_from_args(args)
    torch.set_num_threads(args.threads)
    hooks = [make_hook(name) for name in args.hook]
    if not args.no_progress:
        hooks.append(ProgressBar(desc=f"training on {config.dataset}"))
    metrics = run_toy(config, args.out, resume=args.resume, hooks=hooks)
    print(summary(metrics, args.out))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("swissroll", help="train and measure the 2-D toy example (swissroll and others)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=handler)
