r"""DDPM's discrete-time variational bound for any sdeflow model, and improved DDPM's hybrid loss.

For a model whose network gives ε̂ (``model.predicted_noise(y, t)``, any parameterization), on the
N-step chain of its forward SDE (:mod:`sdeflow.discrete.chain`), the reverse steps are

.. math::  p(y_{n-1}\mid y_n) = N(\mu_\theta(y_n, n), \sigma_n^2 I),\qquad
           \mu_\theta = c^x_n\hat x_0 + c^y_n y_n = \frac{1}{a_n}\Big(y_n - \frac{\beta_n}{\sqrt{v_n}}\hat\varepsilon\Big),
           \qquad \hat x_0 = \frac{y_n - \sqrt{v_n}\,\hat\varepsilon}{m_n}

(DDPM's mean: the posterior mean with x̂_0 in place of x; for n = 1 it is x̂_0 itself), σ_n² one of
:mod:`sdeflow.discrete.variances`, and p(y_N) = p_T. The bound (Sohl-Dickstein et al. 2015; DDPM,
Eq. 5) is

.. math::  \log p(x) \ge E_{q(y_1|x)}[\log p(x\mid y_1)]
           - \sum_{n=2}^N E_{q(y_n|x)}\,\mathrm{KL}\big(q(y_{n-1}\mid y_n, x)\,\|\,p(y_{n-1}\mid y_n)\big)
           - \mathrm{KL}\big(q(y_N\mid x)\,\|\,p_T\big),

each KL between Gaussians in closed form: with
:math:`\tilde\mu_n - \mu_\theta = c^x_n (x - \hat x_0) = c^x_n\frac{\sqrt{v_n}}{m_n}(\hat\varepsilon - \varepsilon)`,
:math:`\mathrm{KL}_n = \tfrac12\sum_i\big[\tilde\beta_n/\sigma_n^2 - 1 - \log(\tilde\beta_n/\sigma_n^2)
+ (\tilde\mu_n - \mu_\theta)_i^2/\sigma_n^2\big]`, one draw of y_n per term. The decoder
:math:`p(x\mid y_1)` is N(x̂_0, σ_1²) for continuous data, or, given :class:`PixelBins`, DDPM's
discretized Gaussian over the 256 pixel bins, which makes the bound one on log P(x) of the 8-bit
image (:meth:`DiscreteBound.bits_per_dim`).

Estimators (:func:`discrete_bound`): every step (N network evaluations per example), or K steps per
example drawn from a proposal over n = 2..N (uniform, or :func:`fit_step_proposal`'s
:math:`p(n)\propto\sqrt{E[\mathrm{KL}_n^2]}`, improved DDPM's importance sampling), unbiased as
:math:`\frac1K\sum_k \mathrm{KL}_{n_k}/p(n_k)`; the decoder is always evaluated and the prior is
in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.transforms import NUM_LEVELS, bits_per_dim
from ..utils import append_dims, check_finite, check_positive_float, check_positive_int, sum_except_batch
from .chain import ForwardChain, PixelBins, gaussian_log_prob, prior_kl
from .variances import LearnedVariance, check_variance, noise_and_variance

__all__ = ["DiscreteBound", "discrete_bound", "step_terms", "fit_step_proposal", "hybrid_loss", "variance_loss",
           "bound_bits_per_dim"]

#: The share of the uniform distribution mixed into a fitted step proposal, so that every step keeps
#: a positive probability (the estimate is unbiased only then).
UNIFORM_SHARE = 0.01


def bound_bits_per_dim(log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    r"""−log₂ P(x)/D of a bound on the log-probability of 8-bit data (nats, (B,)): that is
    :func:`sdeflow.data.transforms.bits_per_dim` with the cell volume's ``logdet`` D·ln 256, since a
    probability of the discrete image needs no dequantization: bpd = −log P/(D ln 2)."""
    return bits_per_dim(log_prob, torch.full_like(log_prob, num_dims * math.log(NUM_LEVELS)), num_dims)


@dataclass(frozen=True)
class DiscreteBound:
    """Per-example terms of the discrete bound, float64 (B,), in nats.

    Attributes:
        log_prob: the bound, decoder_log_prob − step_kl − prior_kl (≤ log P(x) in expectation).
        decoder_log_prob: one draw of log p(x | y_1).
        step_kl: the estimate of Σ_{n≥2} KL_n.
        step_kl_se: its standard error from the sampled steps (0 when every step is taken; NaN for
            one sampled step).
        prior_kl: KL(q(y_N | x) ‖ p_T), exact.
        num_dims: D.
        discrete: whether the decoder was the discretized one (a bound on an 8-bit image's P(x)).
        nfe: network evaluations per example.
    """

    log_prob: torch.Tensor
    decoder_log_prob: torch.Tensor
    step_kl: torch.Tensor
    step_kl_se: torch.Tensor
    prior_kl: torch.Tensor
    num_dims: int
    discrete: bool
    nfe: int

    def bits_per_dim(self) -> torch.Tensor:
        """The bound in bits per dimension of the 8-bit images, (B,) (:func:`bound_bits_per_dim`);
        ValueError for a bound computed with the continuous decoder (a density, not a probability)."""
        if not self.discrete:
            raise ValueError("bits/dim needs the discretized decoder: compute the bound with bins=PixelBins(...)")
        return bound_bits_per_dim(self.log_prob, self.num_dims)


def _draw(chain: ForwardChain, x: torch.Tensor, n: torch.Tensor, generator):
    """y_n = m_n x + √v_n ε at the steps n (B,), with ε; and the times t_n (B,) in x's dtype."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    m = append_dims(chain.mean_weight.to(x.device)[n], x.ndim).to(x.dtype)
    std = append_dims(chain.var.to(x.device)[n].sqrt(), x.ndim).to(x.dtype)
    return m * x + std * noise, noise, chain.times.to(device=x.device, dtype=x.dtype)[n]


def _negative_terms(chain: ForwardChain, x, noise, eps_hat, n, var, bins) -> torch.Tensor:
    """Per row, KL_n for n ≥ 2 and −log p(x | y_1) for n = 1, float64 (B,); ``var`` = σ_n²."""
    def index(table):
        return append_dims(table.to(x.device)[n], x.ndim)

    # x − x̂_0 = √v_n (ε̂ − ε)/m_n, formed from the noises so that no large y cancels.
    data_error = index(chain.var.sqrt() / chain.mean_weight) * (eps_hat.double() - noise.double())
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    var = var.expand_as(x)
    first = n == 1
    if first.any():
        x0, x0_hat, var0 = x[first].double(), (x.double() - data_error)[first], var[first]
        decoder = bins.log_prob(x0, x0_hat, var0) if bins is not None else gaussian_log_prob(x0, x0_hat, var0)
        out = out.index_put((first,), -decoder)
    rest = ~first
    if rest.any():
        ratio = index(chain.posterior_var)[rest] / var[rest]
        mean_error = index(chain.posterior_data_coef)[rest] * data_error[rest]
        kl = 0.5 * sum_except_batch(ratio - 1 - torch.log(ratio) + mean_error ** 2 / var[rest])
        out = out.index_put((rest,), kl)
    return out


def step_terms(model, x: torch.Tensor, chain: ForwardChain, variance, n: torch.Tensor,
               bins: PixelBins | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One-draw estimates of the bound's term at the step n (B,) of each example of x (B, ...):
    KL_n for n ≥ 2, −log p(x | y_1) for n = 1. float64 (B,); one network evaluation per example."""
    y, noise, t = _draw(chain, x, n, generator)
    eps_hat, var = noise_and_variance(model, variance, chain, n, y, t)
    return _negative_terms(chain, x, noise, eps_hat, n, var, bins)


def _check_inputs(x, chain, variance, bins):
    check_finite("x", x)
    if not isinstance(chain, ForwardChain):
        raise ValueError(f"chain must be a ForwardChain (sdeflow.discrete.forward_chain); got {type(chain).__name__}")
    check_variance(variance)
    if bins is not None and not isinstance(bins, PixelBins):
        raise ValueError(f"bins must be None (continuous data) or a PixelBins; got {type(bins).__name__}")


def _steps(chain: ForwardChain, step: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), step, dtype=torch.long, device=device)


@torch.no_grad()
def fit_step_proposal(model, x: torch.Tensor, chain: ForwardChain, variance="posterior",
                      bins: PixelBins | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Improved DDPM's importance distribution over the steps n = 2..N,
    :math:`p(n) \propto \sqrt{E[\mathrm{KL}_n^2]}` estimated on the pilot batch x (every step, N − 1
    evaluations per example), mixed with ``UNIFORM_SHARE`` of the uniform. float64 (N + 1,) indexed
    by n, zero at n = 0 and 1; a plain value to keep and pass to :func:`discrete_bound`."""
    _check_inputs(x, chain, variance, bins)
    if chain.chain_steps < 2:
        raise ValueError("chain must have at least 2 steps to sample steps from")
    scale = torch.zeros(chain.chain_steps + 1, dtype=torch.float64)
    for step in range(2, chain.chain_steps + 1):
        terms = step_terms(model, x, chain, variance, _steps(chain, step, x.shape[0], x.device), bins, generator)
        scale[step] = terms.pow(2).mean().sqrt().cpu()
    uniform = torch.zeros_like(scale)
    uniform[2:] = 1.0 / (chain.chain_steps - 1)
    return (1 - UNIFORM_SHARE) * scale / scale.sum() + UNIFORM_SHARE * uniform


def _check_proposal(step_proposal, chain: ForwardChain) -> torch.Tensor:
    if step_proposal is None:
        proposal = torch.zeros(chain.chain_steps + 1, dtype=torch.float64)
        proposal[2:] = 1.0
        return proposal / proposal.sum()
    proposal = torch.as_tensor(step_proposal, dtype=torch.float64).cpu()
    if proposal.shape != (chain.chain_steps + 1,) or not bool((proposal[2:] > 0).all()) or bool(proposal[:2].any()):
        raise ValueError(f"step_proposal must be a tensor of shape ({chain.chain_steps + 1},) indexed by the step, "
                         f"zero at n = 0 and 1 and positive at n = 2..N (see fit_step_proposal)")
    return proposal / proposal.sum()


def _sampled_step_kl(model, x, chain, variance, bins, n_sampled_steps, proposal, generator):
    """(estimate, standard error) of Σ_{n≥2} KL_n from K steps per example drawn from the proposal."""
    batch = x.shape[0]
    proposal = proposal.to(x.device)
    draws = torch.multinomial(proposal, batch * n_sampled_steps, replacement=True, generator=generator)
    draws = draws.reshape(n_sampled_steps, batch)
    values = torch.stack([step_terms(model, x, chain, variance, n, bins, generator) / proposal[n] for n in draws])
    se = values.std(dim=0) / math.sqrt(n_sampled_steps) if n_sampled_steps > 1 else torch.full_like(values[0], math.nan)
    return values.mean(dim=0), se


def discrete_bound(model, x: torch.Tensor, chain: ForwardChain, variance="posterior", *,
                   bins: PixelBins | None = None, n_sampled_steps: int | None = None,
                   step_proposal: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> DiscreteBound:
    """The discrete-time bound of the module docstring for each example of x (B, ...) in the model's
    space (for images, :meth:`PixelBins.centre` of the uint8 images, with ``bins`` set).

    ``n_sampled_steps`` None: every step n = 2..N (exact in the steps; N evaluations per example).
    An int K: K steps per example drawn from ``step_proposal`` ((N + 1,), :func:`fit_step_proposal`;
    None: uniform over 2..N), unbiased, with the standard error of the K draws (1 + K evaluations).
    ``variance``: "posterior", "step", an AnalyticVariance or a LearnedVariance. No gradients.
    Returns a :class:`DiscreteBound`."""
    _check_inputs(x, chain, variance, bins)
    if step_proposal is not None and n_sampled_steps is None:
        raise ValueError("step_proposal needs n_sampled_steps (the number of steps drawn per example)")
    batch, device = x.shape[0], x.device
    with torch.no_grad():
        decoder = -step_terms(model, x, chain, variance, _steps(chain, 1, batch, device), bins, generator)
        zeros = torch.zeros(batch, dtype=torch.float64, device=device)
        if chain.chain_steps < 2:
            step_kl, step_kl_se, nfe = zeros, zeros, 1
        elif n_sampled_steps is None:
            step_kl = sum(step_terms(model, x, chain, variance, _steps(chain, step, batch, device), bins, generator)
                          for step in range(2, chain.chain_steps + 1))
            step_kl_se, nfe = zeros, chain.chain_steps
        else:
            n_sampled_steps = check_positive_int("n_sampled_steps", n_sampled_steps)
            proposal = _check_proposal(step_proposal, chain)
            step_kl, step_kl_se = _sampled_step_kl(model, x, chain, variance, bins, n_sampled_steps, proposal,
                                                   generator)
            nfe = 1 + n_sampled_steps
    prior = prior_kl(model.sde, chain, x).to(device)
    return DiscreteBound(log_prob=decoder - step_kl - prior, decoder_log_prob=decoder, step_kl=step_kl,
                         step_kl_se=step_kl_se, prior_kl=prior, num_dims=x[0].numel(), discrete=bins is not None,
                         nfe=nfe)


def _variance_terms(model, variance: LearnedVariance, x, chain, bins, generator):
    """(ε̂ − ε per dimension², N·L_n with the mean's ε̂ detached), each (B,), for n ~ U{1..N}."""
    n = torch.randint(1, chain.chain_steps + 1, (x.shape[0],), generator=generator, device=x.device)
    y, noise, t = _draw(chain, x, n, generator)
    eps_hat, var = noise_and_variance(model, variance, chain, n, y, t)
    simple = sum_except_batch((eps_hat - noise) ** 2) / x[0].numel()
    vlb = chain.chain_steps * _negative_terms(chain, x, noise, eps_hat.detach(), n, var, bins)
    return simple, vlb.to(simple.dtype)


def _check_learned(x, chain, variance, bins, name: str = "variance"):
    _check_inputs(x, chain, "posterior", bins)
    if not isinstance(variance, LearnedVariance):
        raise ValueError(f"{name} must be a LearnedVariance; got {type(variance).__name__}")


def variance_loss(model, variance: LearnedVariance, x: torch.Tensor, chain: ForwardChain, *,
                  bins: PixelBins | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The learned variance's part of the hybrid loss per example, (B,), in nats:
    :math:`N\,L_n(\mathrm{sg}[\hat\varepsilon], \sigma^2_\phi(y_n, n))` for a step n ~ U{1..N} per
    example and one draw :math:`y_n = m_n x + \sqrt{v_n}\varepsilon`, L_n the bound's term at step n
    (KL_n, or −log p(x | y_1) at n = 1; see :func:`step_terms`), an unbiased estimate of the bound's
    step terms. The mean's ε̂ is detached: only the variance learns from it (through the shared
    network when ``variance`` is the model's own head, :meth:`LearnedVariance.of`, evaluated once).
    Add it, weighted, to any loss of the mean: sdeflow's training does so with its DSM loss."""
    _check_learned(x, chain, variance, bins)
    return _variance_terms(model, variance, x, chain, bins, generator)[1]


def hybrid_loss(model, variance_net: LearnedVariance, x: torch.Tensor, chain: ForwardChain, *,
                vlb_weight: float = 1e-3, bins: PixelBins | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Improved DDPM's :math:`L_{hybrid} = L_{simple} + \lambda L_{vlb}` per example, (B,), for a step
    n ~ U{1..N} per example and one draw :math:`y_n = m_n x + \sqrt{v_n}\varepsilon`:

    .. math::  L_{simple} = \frac1D\|\hat\varepsilon(y_n, t_n) - \varepsilon\|^2,\qquad
               L_{vlb} = \frac{N}{D}\,L_n\big(\mathrm{sg}[\hat\varepsilon],\ \sigma^2_\phi(y_n, n)\big),

    L_n as in :func:`variance_loss` (whose value is D·L_vlb), and sg the stop-gradient: the mean
    learns from L_simple only, the variance from L_vlb only. λ = ``vlb_weight`` (improved DDPM's
    10⁻³, who state L_vlb in bits). Differentiable in both networks; one network evaluation when the
    variance is the model's own head."""
    _check_learned(x, chain, variance_net, bins, "variance_net")
    vlb_weight = check_positive_float("vlb_weight", vlb_weight)
    simple, vlb = _variance_terms(model, variance_net, x, chain, bins, generator)
    return simple + vlb_weight * vlb / x[0].numel()
