"""Computes the small-form figures that tests/test_regression.py pins (run as a script to print them).

Each figure comes from a fixed seed, in float64, on a small MLP with fixed weights: a DSM loss, the
ELBO with each time proposal, a fitted proposal, the ODE likelihood, and samplers' outputs. The
functions here call the library's public API; the pins were computed before the core was reshaped
(issue 19) and must not move.
"""

from __future__ import annotations

import torch

import sdeflow
from sdeflow.nets.mlp import MLP


def _model(parameterization: str = "noise"):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, n_blocks=1)
    with torch.no_grad():  # the MLP's last layer starts at zero: give every weight a value
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    return sdeflow.PluginReverseSDE(sdeflow.VPSDE(), net, parameterization).double()


def _data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _gen(seed: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scalar(value: torch.Tensor) -> float:
    return float(value.detach())


def figures() -> dict[str, float]:
    """name -> float64 figure."""
    from pin_api import dsm, elbo, fitted_proposal, log_prob_ode, sample, sample_ode

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
    return out


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    for name, value in figures().items():
        print(f"    {name!r}: {value!r},")
