"""What a likelihood estimate is, as one value shared by the Python API (:mod:`sdeflow.likelihood.evaluation`) and
``sdeflow eval``: which bound, and every setting it takes."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils import config_field, validate_fields
from .divergence import DIVERGENCES, PROBES
from .elbo import default_t_min
from .ode import ADAPTIVE_SOLVERS
from .time_proposals import TIME_SAMPLINGS
from ..discrete.variances import VARIANCES, check_variance
from ..utils import check_nonneg_float, check_positive_float, check_positive_int, check_t_min

__all__ = ["LikelihoodSettings", "BOUNDS", "DEQUANTIZATIONS", "VARIANCES", "STEP_SAMPLINGS"]


def _check_variance(name: str, value):
    """A variance name (``VARIANCES``; "analytic" computed later) or an AnalyticVariance."""
    return check_variance(value, name, analytic_by_name=True)


#: What a likelihood estimate bounds or computes: the continuous-time ELBO, the probability-flow ODE, or
#: the discrete-time bound of DDPM on N steps of the forward SDE (:mod:`sdeflow.discrete`).
BOUNDS = ("elbo", "ode", "discrete")
#: How the discrete bound's sampled steps are drawn.
STEP_SAMPLINGS = ("fitted", "uniform")
#: How ``evaluate_bpd`` turns 8-bit levels into continuous data: uniform noise in each level's bin, or
#: the truncated normal of i-DODE (:func:`sdeflow.data.transforms.truncated_normal_dequantize`).
DEQUANTIZATIONS = ("uniform", "truncated-normal")


@dataclass(frozen=True)
class LikelihoodSettings:
    """What a likelihood estimate is: every setting of :func:`log_likelihood` and :func:`evaluate_bpd`
    but the data, in one value shared by the Python API and ``sdeflow eval`` (whose flags are built
    from these fields). :meth:`validate` is the one place their rules are checked; :meth:`describe`
    says in one line what they select."""

    bound: str = config_field("elbo: the unbiased ELBO of the reverse SDE; ode: the probability-flow ODE's exact "
                       "log-likelihood; discrete: DDPM's discrete-time bound on chain_steps steps",
                       choices=lambda: BOUNDS, default="elbo")
    n_slices: int = config_field("time draws per example of the ELBO, one per stratum of the time proposal", default=4,
                         check=check_positive_int)
    time_sampling: str = config_field("the ELBO's time proposal: fitted on a pilot batch (lowest variance), uniform, "
                                  "or importance ∝ g²/v", choices=lambda: TIME_SAMPLINGS, default="fitted")
    divergence: str = config_field("hutchinson (one probe) or exact (D times the cost)", choices=lambda: DIVERGENCES,
                               default="hutchinson")
    probe: str = config_field("Hutchinson probe", choices=lambda: PROBES, default="rademacher")
    t_min: float | None = config_field("where the estimate starts (decoding with a Gaussian there); default: the "
                                   "images' quantization level t_σ, or 1e-5·T (ELBO) / 0 (ODE) for other data",
                                   default=None, check=check_nonneg_float)
    dequantization: str = config_field("images: uniform, or i-DODE's truncated normal", choices=lambda: DEQUANTIZATIONS,
                                   default="uniform")
    rtol: float = config_field("the ODE solver's relative tolerance", default=1e-5, check=check_positive_float)
    atol: float = config_field("the ODE solver's absolute tolerance", default=1e-5, check=check_positive_float)
    solver: str = config_field("the ODE's adaptive torchdiffeq solver", choices=lambda: ADAPTIVE_SOLVERS, default="dopri5")
    fit_examples: int = config_field("pilot examples the fitted time proposal is fitted on", default=16,
                              check=check_positive_int)
    chain_steps: int = config_field("the discrete bound's chain length N, the forward SDE's steps (t_n = n·T/N)", default=1000,
                         check=check_positive_int)
    variance: str = config_field("the discrete bound's reverse variances: posterior (β̃), step (β), analytic "
                          "(Analytic-DPM, estimated once on training images), or learned (the model's own "
                          "variance head, improved DDPM's)", choices=lambda: VARIANCES,
                          default="posterior", check=_check_variance)
    sampled_steps: int | None = config_field("the discrete bound: draw this many of its N steps per example (unbiased, "
                                      "with a standard error) instead of taking every step", default=None,
                                      check=check_positive_int)
    step_sampling: str = config_field("how the discrete bound's sampled steps are drawn: fitted (improved DDPM's "
                               "p(n) ∝ √E[KL_n²] on fit_examples pilot examples, N − 1 evaluations each) or "
                               "uniform", choices=lambda: STEP_SAMPLINGS, default="fitted")

    def validate(self, T: float | None = None) -> "LikelihoodSettings":
        """Raise ``ValueError`` naming the first bad setting (t_min against the model's ``T`` if given);
        return self."""
        validate_fields(self)
        if self.t_min is not None and T is not None:
            check_t_min(self.t_min, T)
        return self

    def describe(self, T: float = 1.0, fit_examples: int | None = None) -> str:
        """One line saying what these settings estimate, e.g. "ELBO from t_min 1e-05 (Gaussian decoder),
        time proposal fitted on 16 pilot examples (denoising form with a fitted control variate), 4 slices
        per example" or "probability-flow ODE from t_min 0, dopri5, rtol 1e-05, atol 1e-05, Hutchinson
        divergence (rademacher probe)". ``fit_examples``: the pilot's actual size (default the setting)."""
        div = f"Hutchinson divergence ({self.probe} probe)" if self.divergence == "hutchinson" else "exact divergence"
        t_min = self.t_min
        if self.bound == "discrete":
            variance = self.variance if isinstance(self.variance, str) else "analytic"
            steps = "every step"
            if self.sampled_steps is not None:
                steps = f"{self.sampled_steps} steps per example drawn " + (
                    f"from a proposal fitted on {fit_examples or self.fit_examples} pilot examples"
                    if self.step_sampling == "fitted" else "uniformly")
            return (f"discrete-time bound on N = {self.chain_steps} steps (t_n = n·T/N), {variance} reverse variances, "
                    f"{steps}")
        if self.bound == "ode":
            return (f"probability-flow ODE from t_min {t_min or 0:g}, {self.solver}, rtol {self.rtol:g}, "
                    f"atol {self.atol:g}, {div}")
        t_min = default_t_min(T) if t_min is None else t_min
        start = f"ELBO from t_min {t_min:g}" + (" (Gaussian decoder)" if t_min > 0 else "")
        if self.time_sampling == "fitted":
            how = (f"time proposal fitted on {fit_examples or self.fit_examples} pilot examples (denoising form "
                   "with a fitted control variate")
            how += ", Hutchinson form with the exact divergence where quieter)" if self.divergence == "exact" else ")"
        else:
            how = {"uniform": "uniform time", "importance": "importance time proposal q ∝ g²/v"}[self.time_sampling]
            how += f", {div}"
        return f"{start}, {how}, {self.n_slices} slice{'s' if self.n_slices > 1 else ''} per example"
