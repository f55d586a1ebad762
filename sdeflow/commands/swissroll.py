"""``sdeflow swissroll``: train, measure and draw the 2-D toy example (see :mod:`sdeflow.toy`)."""

from __future__ import annotations

import sys

from ..cli import fraction, lmbd, positive_float, positive_int
from ..data.toy import DATASETS

DESCRIPTION = """Train a plug-in reverse SDE (VP SDE, small MLP) on a 2-D toy data set, then write
into --out: samples.png (data beside samples for each λ), trajectories_lmbd<λ>.png (particle paths
from the prior to the data, coloured by time), training.png (loss and running ELBO against step)
and metrics.json (test ELBO, ODE log-likelihood, sliced Wasserstein distances, timings)."""


def add_arguments(parser) -> None:
    """The example's flags; shared by the subcommand and ``examples/swissroll.py``."""
    from ..toy import ToyConfig

    defaults = ToyConfig()
    parser.add_argument("--dataset", default=defaults.dataset, choices=tuple(DATASETS), metavar="NAME",
                        help=f"toy data set: {', '.join(DATASETS)} (default: %(default)s)")
    parser.add_argument("--out", default="runs/swissroll", metavar="DIR",
                        help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="training batch size (default: %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr,
                        help="peak Adam learning rate, after warm-up, decayed by a cosine (default: %(default)s)")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="decay of the weight average that is evaluated, in [0, 1) (default: %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=defaults.hidden,
                        help="MLP width (default: %(default)s)")
    parser.add_argument("--blocks", type=positive_int, default=defaults.n_blocks,
                        help="MLP residual blocks (default: %(default)s)")
    parser.add_argument("--fourier-features", type=int, default=defaults.fourier_features,
                        help="random Fourier features of the input (0: none) (default: %(default)s)")
    parser.add_argument("--lmbd", type=lmbd, nargs="+", default=[], metavar="λ",
                        help="extra λ values to sample besides 0 (reverse SDE) and 1 (ODE), e.g. --lmbd 0.5 0.9")
    parser.add_argument("--sample-steps", type=positive_int, default=defaults.sample_steps,
                        help="Euler steps of the sampler (default: %(default)s)")
    parser.add_argument("--n-samples", type=positive_int, default=defaults.n_samples,
                        help="samples per λ for the figure and the sliced Wasserstein distance (default: %(default)s)")
    parser.add_argument("--n-likelihood", type=positive_int, default=defaults.n_likelihood,
                        help="test points for the ELBO and the ODE log-likelihood (default: %(default)s)")
    parser.add_argument("--weighting", default=defaults.weighting, choices=("noise", "likelihood"),
                        help="DSM loss weighting (default: %(default)s)")
    parser.add_argument("--time-sampling", default=defaults.time_sampling, choices=("uniform", "importance"),
                        help="time proposal of the DSM loss (default: %(default)s)")
    parser.add_argument("--second-order-fraction", type=fraction, default=defaults.second_order_fraction,
                        metavar="F", help="train the last fraction F of the steps with second-order score "
                        "matching as well (Lu et al. 2022), which makes the ODE likelihood agree with the ELBO; "
                        "0: first-order only (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="torch device (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch; the 2-D network is too small to gain from more, and one "
                             "thread never stalls on a busy machine (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    """The :class:`~sdeflow.toy.ToyConfig` the parsed ``args`` ask for (validated)."""
    from ..toy import ToyConfig

    lmbds = tuple(sorted({0.0, 1.0, *args.lmbd}))
    return ToyConfig(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     ema_decay=args.ema_decay, hidden=args.hidden, n_blocks=args.blocks,
                     fourier_features=args.fourier_features, lmbds=lmbds,
                     sample_steps=args.sample_steps, n_samples=args.n_samples,
                     n_likelihood=args.n_likelihood, weighting=args.weighting,
                     time_sampling=args.time_sampling, second_order_fraction=args.second_order_fraction,
                     seed=args.seed, device=args.device).validate()


def summary(metrics: dict, out_dir: str) -> str:
    """A short human summary of the metrics."""
    cfg = metrics["config"]
    lines = [f"{cfg['dataset']}: trained {cfg['steps']} steps in {metrics['train_seconds']:.0f} s "
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

    from ..toy import run_toy

    config = config_from_args(args)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, desc=f"training on {config.dataset}", unit="step",
               disable=args.no_progress or None, dynamic_ncols=True)
    shown = {"running_elbo": None}

    def progress(state: dict) -> None:
        if state["running_elbo"] is not None:
            shown["running_elbo"] = state["running_elbo"]
        bar.update(1)
        if state["step"] % 25 == 0 or state["step"] == config.steps:
            elbo = shown["running_elbo"]
            bar.set_postfix(loss=f"{state['loss']:.4f}", elbo="…" if elbo is None else f"{elbo:.3f}")
        if state["step"] == config.steps:
            bar.close()
            print("evaluating: ELBO, ODE likelihood, samples for λ =",
                  ", ".join(f"{l:g}" for l in config.lmbds), file=sys.stderr)

    try:
        metrics = run_toy(config, args.out, callback=progress)
    finally:
        bar.close()
    print(summary(metrics, args.out))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("swissroll", help="train and measure the 2-D toy example (swissroll and others)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=handler)
