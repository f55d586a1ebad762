"""Computes the small-form figures that tests/test_regression.py pins (run as a script to print the
pins, each with its tolerance's name).

Each figure comes from a fixed seed, in float64, on a small MLP with fixed weights: a DSM loss, the
ELBO with each time proposal, a fitted proposal, the ODE likelihood, samplers' outputs, inpainting
and denoising; and on a tiny float64 U-Net, the bits/dim of 8-bit images under each bound (ELBO, ODE,
discrete) and the training objective on a fixed batch. The functions here call the library's public
API (through pin_api).

Every input is drawn so that it is the same on any machine up to a few float64 ulps (the pins'
tolerances cover that, tests/test_regression.py): the weights are float64 normal draws (torch's
float32 normal draws take a vectorized log/sin/cos on AVX2/AVX-512 and the scalar libm elsewhere,
which differ by a float32 ulp, 6e-8 of a weight, and moved every figure by 1e-9 to 4e-7), and the
time embedding's frequencies are computed in float64 for the same reason (the MLP builds them in
float32). The adaptive ODE solves run at pin_api.ODE_TOLERANCE.

History: the pins were computed before the core was reshaped (issue 19). They were recomputed once,
when the weights above became float64 and the ODE solves tight, after checking that the code of
that day still reproduced every old pin under the old settings (all within 5e-15 relative, except
sample_ode's loose dopri5 solve, 1e-10: the machine-dependence this change removes).
"""

from __future__ import annotations

import math

import torch

import sdeflow
from sdeflow.nets.mlp import MLP

#: The figures that come out of an adaptive ODE solve: their tolerance follows from the solve's own.
ADAPTIVE_SOLVE_FIGURES = ("ode_logp", "sample_ode", "image_ode")


def _model(parameterization: str = "noise"):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, n_blocks=1).double()
    weights = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the MLP's last layer starts at zero: give every weight a value
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=weights, dtype=torch.float64))
        embedding = net.time_embedding
        n_freqs = embedding.freqs.numel()
        embedding.freqs.copy_(2 * math.pi * torch.exp(torch.linspace(
            math.log(0.25), math.log(64.0), n_freqs, dtype=torch.float64)))
    return sdeflow.PluginReverseSDE(sdeflow.VPSDE(), net, parameterization).double()


def _data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gen(seed: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scalar(value: torch.Tensor) -> float:
    return float(value.detach())


def _unet_model(parameterization: str = "noise"):
    """A tiny U-Net model (1×8×8 images, logit pixels) in float64 with every weight drawn in float64."""
    from sdeflow.experiments.images import image_model_config

    net = dict(base_channels=4, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0)
    config = image_model_config("toy", "small", net_overrides=net, in_channels=1, image_size=8,
                                parameterization=parameterization)
    model = sdeflow.build_model(config).double()
    weights = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised output layers would hide the network: every weight gets a value
        for module in model.net.modules():
            for name, p in module.named_parameters(recurse=False):
                draw = torch.randn(p.shape, generator=weights, dtype=torch.float64)
                if isinstance(module, torch.nn.GroupNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * draw)
                else:
                    p.copy_(draw / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * draw)
        # The embedding's sin/cos of t·1000·ω_j at ω_0 = 1 oscillate 160 times over [0, T]: a random network
        # passes them on, and the adaptive ODE then takes ~10⁴ steps. Only the slow components reach it.
        half = net["base_channels"] // 2
        fast = [j for j in range(half) if model.net.time_scale * 10000.0 ** (-j / max(half - 1, 1)) > 10]
        model.net.time_embed[0].weight[:, fast + [j + half for j in fast]] = 0.0
    return model, config


def _images(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


def figures() -> dict[str, float]:
    """name -> float64 figure."""
    from pin_api import (denoise, dsm, elbo, evaluate_bpd, fitted_proposal, inpaint, log_prob_ode, sample,
                         sample_ode, training_loss)

    out = {}
    x = _data()
    for parameterization in ("noise", "drift", "score", "velocity"):
        model = _model(parameterization)
        out[f"dsm_{parameterization}"] = _scalar(dsm(model, x, _gen()).sum())
        out[f"dsm_likelihood_importance_{parameterization}"] = _scalar(
            dsm(model, x, _gen(), time_sampling="importance", weighting="likelihood").sum())
    model = _model()
    for time_sampling in ("uniform", "importance"):
        out[f"elbo_{time_sampling}"] = _scalar(elbo(model, x, _gen(), time_sampling).sum())
    proposal = fitted_proposal(model, x, _gen())
    out["fitted_probs"] = _scalar((proposal.probs * torch.arange(len(proposal.probs))).sum())
    out["fitted_control"] = _scalar(proposal.control.sum())
    out["elbo_fitted"] = _scalar(elbo(model, x, _gen(), "fitted", n_slices=4).sum())
    out["ode_logp"] = _scalar(log_prob_ode(model, x, _gen()).sum())
    model = _model("drift")  # bounded as t -> 0, so the samples stay of the data's size
    for method in ("euler", "ddim", "dpm++2m", "heun"):
        out[f"sample_{method}"] = _scalar(sample(model, method, _gen()).pow(2).sum())
    out["sample_ode"] = _scalar(sample_ode(model, _gen()).pow(2).sum())
    mask = torch.tensor([True, False])
    for scheme in ("replacement", "guided"):
        out[f"inpaint_{scheme}"] = _scalar(inpaint(model, x, mask, scheme, _gen()).pow(2).sum())
    out["denoise"] = _scalar(denoise(model, x + 0.5 * _data(), 0.5, _gen()).pow(2).sum())
    unet, config = _unet_model()
    for bound in ("elbo", "ode", "discrete"):
        out[f"image_{bound}"] = evaluate_bpd(unet, _images(), config, bound, generator_seed=0)
    y = torch.randn(4, 1, 8, 8, generator=_gen(4), dtype=torch.float64)
    out["training_loss"] = _scalar(training_loss(unet, y, _gen()))
    out["training_loss_samples"] = _scalar(training_loss(unet, y, _gen(), time_sampling="uniform", weighting="noise"))
    return out


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    for name, value in figures().items():
        tolerance = {"image_ode": "IMAGE_SOLVE"}.get(name, "ADAPTIVE_SOLVE" if name in ADAPTIVE_SOLVE_FIGURES
                                                     else "FIXED_OPERATIONS")
        print(f"    {name!r}: ({value!r}, {tolerance}),")
