"""Accuracy of conditional sampling against network evaluations, on exact scores.

Data: a correlated 4-D Gaussian (full covariance), whose score under the VP SDE, conditionals and
posteriors are closed-form (sdeflow.nets.oracles.FullCovarianceGaussian). For each number of Euler
steps, every method draws n samples of one conditional law and we report
    mean error  ‖ mean(samples) − exact mean ‖₂,
    cov error   ‖ cov(samples) − exact cov ‖_F,
medians over repeats (seeds), with NFE (network evaluations, from the sampler's callback) and the guided
methods' backward passes. The Monte-Carlo floor (the same errors for n exact draws) is printed
first: no sampler can beat it.

    python benchmarks/conditional.py [--n 4000] [--repeats 3] [--n-steps 25 50 100 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sdeflow
from sdeflow.samplers.conditional import denoise, inpaint, posterior_sample
from sdeflow.nets.oracles import ExactScoreNet, FullCovarianceGaussian
from sdeflow.samplers import SamplerSettings, Trace


def correlated_gaussian() -> FullCovarianceGaussian:
    chol = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0],
                         [-0.5, 0.3, 0.7, 0.0], [0.2, -0.4, 0.5, 0.6]], dtype=torch.float64)
    return FullCovarianceGaussian(torch.tensor([0.5, -1.0, 0.3, 1.0]), chol @ chol.T)


def errors(samples, mean, cov):
    return ((samples.mean(0) - mean).norm().item(), (torch.cov(samples.T) - cov).norm().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-steps", type=int, nargs="+", default=[25, 50, 100, 200], help="sampler steps")
    parser.add_argument("--sde", choices=("vp", "subvp", "ve"), default="vp")
    args = parser.parse_args()
    torch.set_num_threads(2)

    sde = {"vp": sdeflow.VPSDE(), "subvp": sdeflow.SubVPSDE(), "ve": sdeflow.VESDE(sigma_max=20.0)}[args.sde]
    data = correlated_gaussian()
    model = sdeflow.PluginReverseSDE(sde, ExactScoreNet(sde, data, "score"), "score").double()
    x = data.sample(1, generator=torch.Generator().manual_seed(123), dtype=torch.float64)[0]
    n = args.n

    # The problems: denoising at σ_n = 0.7 (A = I), inpainting coordinates 1, 3 given 0, 2, and a
    # general operator with noise.
    noise_std = 0.7
    y_noisy = x + noise_std * torch.randn(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    den_mean, den_cov = data.posterior(torch.eye(4, dtype=torch.float64), y_noisy, noise_std)
    mask = torch.tensor([True, False, True, False])
    inp_mean, inp_cov = data.conditional(mask, x[mask])
    A = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.5, -1.0, 2.0]], dtype=torch.float64)
    y_lin = A @ x + 0.3 * torch.randn(2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    lin_mean, lin_cov = data.posterior(A, y_lin, 0.3)

    def traced(fn, *args, **kwargs):
        """fn's samples and the sampler's last report (its "nfe" and "backward_passes")."""
        trace = Trace()
        return fn(*args, callback=trace, **kwargs), trace.last

    runs = {
        "denoise (exact)": (den_mean, den_cov, lambda s, g: traced(
            denoise, model, y_noisy.expand(n, 4), noise_std, SamplerSettings(n_steps=s), generator=g), slice(None)),
        "inpaint replacement": (inp_mean, inp_cov, lambda s, g: traced(
            inpaint, model, x.expand(n, 4), mask, "replacement", SamplerSettings(n_steps=s), generator=g), ~mask),
        "inpaint guided-isotropic": (inp_mean, inp_cov, lambda s, g: traced(
            inpaint, model, x.expand(n, 4), mask, "guided", SamplerSettings(n_steps=s), covariance="isotropic",
            generator=g), ~mask),
        "inpaint guided-jacobian": (inp_mean, inp_cov, lambda s, g: traced(
            inpaint, model, x.expand(n, 4), mask, "guided", SamplerSettings(n_steps=s), covariance="jacobian",
            generator=g), ~mask),
        "posterior A(2x4), σ=0.3, jacobian": (lin_mean, lin_cov, lambda s, g: traced(
            posterior_sample, model, y_lin.expand(n, 2), A, 0.3, SamplerSettings(n_steps=s), covariance="jacobian",
            generator=g), slice(None)),
    }

    print(f"{type(sde).__name__}, 4-D correlated Gaussian, exact score, Euler–Maruyama (λ = 0), "
          f"n = {n} samples, medians over {args.repeats} seeds")
    floors = {}
    for name, (mean, cov, _, _) in runs.items():
        exact = FullCovarianceGaussian(mean, cov)
        errs = [errors(exact.sample(n, generator=torch.Generator().manual_seed(r), dtype=torch.float64), mean, cov)
                for r in range(args.repeats)]
        floors[name] = tuple(statistics.median(e[i] for e in errs) for i in range(2))
    header = f"{'method':36s} {'steps':>5s} {'NFE':>5s} {'bwd':>5s} {'mean err':>9s} {'cov err':>8s} " \
             f"{'cov err / replacement':>22s} {'s':>6s}"
    print(header)
    print("-" * len(header))
    replacement_cov = {}
    for name, (mean, cov, run, keep) in runs.items():
        print(f"{name + '  [Monte-Carlo floor]':36s} {'':>5s} {'':>5s} {'':>5s} {floors[name][0]:9.4f} "
              f"{floors[name][1]:8.4f}")
        for steps in args.n_steps:
            errs, seconds = [], []
            for r in range(args.repeats):
                start = time.perf_counter()
                samples, info = run(steps, torch.Generator().manual_seed(1000 + r))
                seconds.append(time.perf_counter() - start)
                errs.append(errors(samples[:, keep], mean, cov))
            mean_err = statistics.median(e[0] for e in errs)
            cov_err = statistics.median(e[1] for e in errs)
            if name == "inpaint replacement":
                replacement_cov[steps] = cov_err
            ratio = f"{cov_err / replacement_cov[steps]:.2f}" if name.startswith("inpaint") else ""
            print(f"{name:36s} {steps:5d} {info['nfe']:5d} {info.get('backward_passes', 0):5d} "
                  f"{mean_err:9.4f} {cov_err:8.4f} {ratio:>22s} {statistics.median(seconds):6.2f}")


if __name__ == "__main__":
    main()
