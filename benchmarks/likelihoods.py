"""How precise, how fast and how far apart the likelihood estimators are on a real image model.

On a checkpoint trained by ``sdeflow train`` (by default the one ``benchmarks/cifar_budget.py``
writes, with its held-out split), every ELBO estimator scores the same held-out images twice with
independent seeds. With ℓ¹, ℓ² the two per-image estimates (nats), the spread between images is
Cov(ℓ¹, ℓ²) and the estimator's own variance is Var(ℓ) − Cov(ℓ¹, ℓ²); the table prints bits/dim ±
standard error, the standard error per 1,000 images, the two variances, the seconds of one pass
(pilot fit included) and variance × time against sdeflow-light's uniform-time slice measured in the
same run. Then the probability-flow ODE on the first ``--ode-images`` images, at the default
tolerance and a looser one, with uniform and truncated-normal dequantization: bits/dim ± standard
error (with each image's own Hutchinson probe), NFE and seconds per 100 images.

    python benchmarks/likelihoods.py [--checkpoint runs/cifar_budget/run] [--data-root runs/cifar_budget/data]
        [--images 932] [--ode-images 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sdeflow import LikelihoodSettings

from sdeflow.data.images import load_cifar10
from sdeflow.likelihood.evaluation import evaluate_bpd
from sdeflow.storage.checkpoints import load_model

LN2 = math.log(2.0)

#: (label, evaluate_bpd options): sdeflow-light's slice first (the baseline of the ratios), the default last.
ELBO_ESTIMATORS = [
    ("uniform t, Hutchinson, to t=0 (sdeflow-light)", dict(time_sampling="uniform", t_min=0.0, n_slices=1)),
    ("uniform t, Hutchinson", dict(time_sampling="uniform", n_slices=1)),
    ("importance t, Hutchinson", dict(time_sampling="importance", n_slices=1)),
    ("fitted, 1 slice", dict(n_slices=1)),
    ("fitted, 2 slices", dict(n_slices=2)),
    ("default (sdeflow eval): fitted, 4 slices", dict()),
]

ODE_SETTINGS = [
    ("uniform deq., tol 1e-5 (default)", dict(dequantization="uniform")),
    ("uniform deq., tol 1e-3", dict(dequantization="uniform", rtol=1e-3, atol=1e-3)),
    ("truncated-normal deq., tol 1e-5", dict(dequantization="truncated-normal")),
    ("truncated-normal deq., tol 1e-3", dict(dequantization="truncated-normal", rtol=1e-3, atol=1e-3)),
]


def two_passes(model, images, config, options: dict) -> dict:
    """Score ``images`` twice with seeds 0 and 1; the variance split of the module docstring."""
    runs = [evaluate_bpd(model, images, config, LikelihoodSettings(**options), seed=seed) for seed in (0, 1)]
    a, b = (r["bpd_per_image"].double() for r in runs)
    nats = images[0].numel() * LN2  # bits/dim → nats per image
    between = float(((a - a.mean()) * (b - b.mean())).sum() / (a.numel() - 1)) * nats ** 2
    total = 0.5 * float(a.var() + b.var()) * nats ** 2
    return {"bpd": runs[0]["bpd"], "bpd_se": runs[0]["bpd_se"], "se_per_1000": runs[0]["bpd_se"] * math.sqrt(a.numel() / 1000),
            "seconds": 0.5 * (runs[0]["seconds"] + runs[1]["seconds"]), "between_var": between,
            "estimator_var": total - between, "heavy_tailed": runs[0]["heavy_tailed"],
            "estimator": runs[0]["estimator"], "n": a.numel()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/cifar_budget/run")
    parser.add_argument("--data-root", default="runs/cifar_budget/data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=None, help="ELBO: the first N images (default: all)")
    parser.add_argument("--ode-images", type=int, default=32, help="ODE: the first N images (0: skip the ODE)")
    parser.add_argument("--only", nargs="*", help="run only the ELBO estimators whose label contains one of these")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)

    model, config, step = load_model(args.checkpoint)
    images = load_cifar10(Path(args.data_root), args.split)
    print(f"checkpoint step {step}; {images.shape[0]} {args.split} images; torch threads {torch.get_num_threads()}")
    elbo_images = images[:args.images] if args.images else images
    results = {"step": step, "elbo": {}, "ode": {}}
    print(f"\nELBO on {elbo_images.shape[0]} images, two passes (seeds 0, 1):")
    print(f"{'estimator':48s} {'bits/dim':>16s} {'SE/1000':>8s} {'est. var':>10s} {'between':>10s} "
          f"{'s/pass':>7s} {'var·time vs first':>18s}")
    baseline = None
    for label, options in ELBO_ESTIMATORS:
        if args.only and not any(key in label for key in args.only):
            continue
        r = two_passes(model, elbo_images, config, options)
        cost = max(r["estimator_var"], 1e-300) * r["seconds"]
        baseline = baseline or cost
        r["var_time_gain"] = baseline / cost
        results["elbo"][label] = r
        flag = " (heavy-tailed)" if r["heavy_tailed"] else ""
        print(f"{label:48s} {r['bpd']:8.4f} ± {r['bpd_se']:.4f} {r['se_per_1000']:8.4f} {r['estimator_var']:10.3g} "
              f"{r['between_var']:10.3g} {r['seconds']:7.1f} {r['var_time_gain']:17.1f}x{flag}", flush=True)
    print("(variances in nats² per image; 'est. var' is the estimator's own, 'between' the spread between images)")

    if args.ode_images:
        ode_images = images[:args.ode_images]
        print(f"\nprobability-flow ODE on {ode_images.shape[0]} images (dopri5, Hutchinson, one probe per image):")
        for label, options in ODE_SETTINGS:
            r = evaluate_bpd(model, ode_images, config, LikelihoodSettings(bound="ode", **options))
            per_100 = r["seconds"] * 100 / ode_images.shape[0]
            results["ode"][label] = {k: r[k] for k in ("bpd", "bpd_se", "nfe", "seconds", "estimator")}
            results["ode"][label]["seconds_per_100"] = per_100
            print(f"{label:40s} {r['bpd']:8.4f} ± {r['bpd_se']:.4f}  NFE {r['nfe']:5.0f}  {per_100:7.0f} s/100 images",
                  flush=True)
        same = evaluate_bpd(model, ode_images, config)
        per_100 = same["seconds"] * 100 / ode_images.shape[0]
        results["ode"]["ELBO default, same images"] = {"bpd": same["bpd"], "bpd_se": same["bpd_se"],
                                                        "seconds_per_100": per_100}
        print(f"{'ELBO (default) on the same images':40s} {same['bpd']:8.4f} ± {same['bpd_se']:.4f}  "
              f"{'':9s}  {per_100:7.0f} s/100 images")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
