"""A model trained elsewhere, measured by sdeflow: train a small diffusers UNet2DModel with diffusers' own
DDPM objective (DDPMScheduler.add_noise, ε-MSE) for a CPU budget on CIFAR-10, save it with save_pretrained,
and report ``sdeflow eval --model diffusers:DIR`` bits/dim on held-out images by the ELBO and by the
probability-flow ODE, with seconds per 100 images, beside an sdeflow-trained model of the same budget
(``--compare RUN``: e.g. the run of ``benchmarks/cifar_budget.py``), scored by the same commands on the
same images.

    python benchmarks/foreign_models.py --seconds 720 --compare runs/cifar_budget/run --out runs/foreign
    python benchmarks/foreign_models.py --bound-cost   # what starting at DDPM's first step costs, on an oracle

The data split is cifar_budget's (batches 1-4 of the shared subset for training, batch 5 held out), so
both models are scored on images neither saw. ``--bound-cost`` needs no data: for 8-bit data whose pixels are independent
discretized Gaussians of a given width (in levels), the exact model from t = 0 gives the data's exact
bits/dim; started at the noise level σ̃ of a first step and decoded there, its ODE costs
KL(p₀ ‖ p₀ ∗ N(0, σ̃²)) and its ELBO E[log p₀(x) − E_n log (p₀ ∗ N(0, σ̃²))(x + σ̃n)] per dimension,
computed here by quadrature.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtr

import sdeflow
from sdeflow.cli import main as sdeflow_cli
from sdeflow.data.images import load_cifar10

from cifar_budget import DEFAULT_ROOT, write_split

DATA_ROOT = str(DEFAULT_ROOT)


def train_diffusers(images: torch.Tensor, seconds: float, seed: int, batch_size: int = 32):
    """diffusers' DDPM recipe on uint8 ``images``: x ∈ [−1, 1], t ~ U{0..999}, ε-MSE, Adam 2e-4."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    gen = torch.Generator().manual_seed(seed)
    started, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < seconds:
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)].float() / 127.5 - 1
        noise = torch.randn(batch.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(batch, noise, timesteps), timesteps).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps, losses = steps + 1, losses + [float(loss.detach())]
    return unet, scheduler, {"steps": steps, "final_loss": float(np.mean(losses[-50:])) if losses else None}


def measure(model_flags: list, root: Path, out: Path, limit: int, ode_limit: int) -> dict:
    """``sdeflow eval`` of the model given by ``model_flags`` on the held-out split: the default ELBO on
    the first ``limit`` images and the ODE on the first ``ode_limit``; bits/dim, SE, seconds per 100."""
    results = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, extra, n in (("elbo", [], limit), ("ode", ["--bound", "ode"], ode_limit)):
        path = out / f"{name}.json"
        code = sdeflow_cli(["eval", *model_flags, "--dataset", "cifar10", "--data-root", str(root), "--split", "test",
                        "--limit", str(n), "--json", str(path), "--no-progress", *extra])
        if code != 0:
            raise SystemExit(f"sdeflow eval failed with exit status {code}")
        r = json.loads(path.read_text())
        results[name] = {"bpd": r["bpd"], "bpd_se": r["bpd_se"], "n_images": r["n_images"],
                         "seconds_per_100_images": 100 * r["seconds"] / r["n_images"], "estimator": r["estimator"],
                         **({"nfe": r["nfe"]} if "nfe" in r else {})}
    return results


def bound_cost(level_widths=(1.0, 2.0, 4.0, 16.0), sigmas=None) -> list[dict]:
    """Bits/dim lost by starting the exact model's ODE and ELBO at noise level σ̃ instead of 0, for 8-bit
    data in [−1, 1] whose pixels are discretized N(0, (width·2/256)²) (see the module docstring)."""
    if sigmas is None:
        first = sdeflow.DiscreteVPSDE()  # DDPM's CIFAR-10 schedule
        t1 = torch.tensor(first.first_step_time(), dtype=torch.float64)
        sigmas = {"DDPM first step t_1": float(torch.exp(-0.5 * first.log_snr(t1))),
                  "quantization_time (σ = bin/3)": 1 / (256 * 3)}
    bin_width, edges = 2 / 256, np.linspace(-1, 1, 257)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    rows = []
    for width in level_widths:
        centres = (edges[:-1] + edges[1:]) / 2
        mass = ndtr((edges[1:]) / (width * bin_width)) - ndtr(edges[:-1] / (width * bin_width))
        mass = mass / mass.sum()
        keep = mass > 1e-12
        # x drawn within each kept bin at 16 midpoints, weighted by the bin's mass.
        offsets = (np.arange(16) + 0.5) / 16 - 0.5
        x = (centres[keep][:, None] + offsets[None] * bin_width).ravel()
        w = np.repeat(mass[keep] / 16, 16)
        log_p0 = np.log(np.repeat(mass[keep], 16) / bin_width)
        exact_bpd = float(-(w * log_p0).sum() / math.log(2) + math.log2(128))  # 8 bits minus log2 of the [−1,1] scale
        for label, sigma in sigmas.items():
            def log_blurred(z):
                cdf = ndtr((z[..., None] - edges[None, :-1][..., keep]) / sigma) - ndtr(
                    (z[..., None] - edges[None, 1:][..., keep]) / sigma)
                return np.log(np.maximum((cdf * mass[keep]).sum(-1) / bin_width, 1e-300))
            ode = float((w * (log_p0 - log_blurred(x))).sum() / math.log(2))
            noisy = x[:, None] + sigma * nodes[None, :]
            elbo_term = (log_blurred(noisy) * weights[None, :]).sum(1) / weights.sum()
            elbo = float((w * (log_p0 - elbo_term)).sum() / math.log(2))
            rows.append({"level_width": width, "exact_bpd": exact_bpd, "start": label, "sigma_tilde": sigma,
                         "ode_cost_bpd": ode, "elbo_cost_bpd": elbo})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=720.0, help="diffusers' training budget")
    parser.add_argument("--limit", type=int, default=256, help="held-out images of the ELBO")
    parser.add_argument("--ode-limit", type=int, default=8, help="held-out images of the ODE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument("--compare", default=None, help="an sdeflow run of the same budget, scored alike")
    parser.add_argument("--out", default="runs/foreign")
    parser.add_argument("--bound-cost", action="store_true", help="only the oracle's cost of the bound's start")
    args = parser.parse_args()
    if args.bound_cost:
        for row in bound_cost():
            print(json.dumps(row))
        return
    from diffusers import DDPMPipeline

    out = Path(args.out)
    root, folder = out / "data", out / "diffusers"
    write_split(Path(args.data_root), root)
    unet, scheduler, info = train_diffusers(load_cifar10(root, "train"), args.seconds, args.seed)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    report = {"train_seconds": args.seconds, **info,
              "diffusers": measure(["--model", f"diffusers:{folder}"], root, out / "diffusers-eval", args.limit,
                                   args.ode_limit)}
    if args.compare:
        report["sdeflow"] = measure(["--checkpoint", args.compare], root, out / "sdeflow-eval", args.limit,
                                    args.ode_limit)
    print(json.dumps(report, indent=1))
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
