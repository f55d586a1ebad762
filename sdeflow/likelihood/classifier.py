r"""The classifier a class-conditional diffusion model already is (Li et al. 2023; Clark & Jaini 2023).

With labels, the ELBO gives log p(x | y) for every class y, and Bayes gives

.. math::  \log p(y \mid x) = \mathrm{ELBO}(x \mid y) + \log p(y) - \log \sum_{y'} e^{\mathrm{ELBO}(x \mid y') + \log p(y')}.

:func:`class_elbos` estimates the ELBO of every class in the denoising form, every class of an image
on the same draws (t, ε): paired estimates, whose common noise (the data's, the prior's, the control
variate's) cancels in the differences that decide p(y | x). Its time plan (:func:`fit_class_plan`) is
fitted to those differences, not to each ELBO: it draws where the classes disagree. With
``rounds`` > 1 the draws come in rounds, and after each an image drops the classes clearly below its
leader (adaptive allocation); every class stays paired with the leader, which took every draw.
With an exact score the ELBO is log p(x | y) up to the prior's mismatch at T (Huang et al. 2021), so on
a Gaussian mixture whose components are the classes :func:`classify` gives the Bayes posterior.
"""

from __future__ import annotations

import math
import time

import torch

from ..adapters import bound_start
from ..data.transforms import check_images, preprocess
from ..engine.state import make_generator, step_seed
from ..samplers.guidance import guided
from ..utils import check_positive_float, check_positive_int, check_t_min
from .elbo import chunk_size_for, decoder_log_weight, default_t_min, denoising_terms
from .evaluation import evaluate_bpd, quantization_time
from .plans import EstimatorPlan, _control_coefficients, fit_proposal
from .statistics import mean_se
from .time_proposals import make_proposal

__all__ = ["class_elbos", "classify", "conditional_bpd", "evaluate_classifier", "fit_class_plan"]


def _num_classes(model) -> int:
    num_classes = getattr(model.net, "num_classes", 0)
    if not num_classes:
        raise ValueError("the model's network is unconditional (num_classes=0): classifying needs a network "
                         "trained with classes")
    return num_classes


#: The class plan's pilot: time bins, and examples per bin (fit_class_plan).
PLAN_BINS, PLAN_EXAMPLES = 32, 16


def _class_terms(model, label, x, t, noise, chunk_size):
    """(h₀, w) of the model at class ``label`` on the given draws (:func:`denoising_terms`)."""
    return denoising_terms(guided(model, label), x, t, chunk_size=chunk_size, noise=noise)


@torch.no_grad()
def fit_class_plan(model, x: torch.Tensor, *, n_bins: int = PLAN_BINS, max_examples: int = PLAN_EXAMPLES,
                   defensive: float = 0.02,
                   t_min: float | None = None, generator: torch.Generator | None = None) -> EstimatorPlan:
    r"""The diffusion classifier's time plan: a :class:`~sdeflow.likelihood.plans.EstimatorPlan` whose
    density is fitted to the *differences* between classes, :math:`q \propto \sqrt{E[(h_{0,y} -
    \bar h_0)^2]}` per bin (h₀ of every class on the same draws, h̄₀ their mean over classes), and whose
    control coefficients are those of the classes' mean (:func:`fit_time_proposal`'s rule). The control
    variate w is the same for every class on paired draws, so it cancels in the differences; the
    density puts the draws where the classes disagree (intermediate noise), not where each ELBO is
    noisiest (small t). On a pilot of at most ``max_examples`` of x: n_bins × examples × C forward
    passes; fit it once and pass it to :func:`classify` (any fixed plan keeps the ELBOs unbiased)."""
    num_classes = _num_classes(model)
    t_min = default_t_min(model.T) if t_min is None else check_t_min(t_min, model.T)
    pilot = x[:check_positive_int("max_examples", max_examples)]
    chunk, pilot_terms = chunk_size_for(x), {}

    def integrand(t: torch.Tensor) -> torch.Tensor:
        xs = pilot.repeat((t.numel() // pilot.shape[0],) + (1,) * (pilot.ndim - 1))
        noise = torch.randn(xs.shape, generator=generator, device=xs.device, dtype=xs.dtype)
        terms = [_class_terms(model, label, xs, t, noise, chunk) for label in range(num_classes)]
        h = torch.stack([h0 for h0, _ in terms], dim=1)
        pilot_terms["h"], pilot_terms["w"] = h.mean(1), terms[0][1]
        return h - h.mean(1, keepdim=True)  # (n, C): the spread across classes at each draw

    plan = fit_proposal(integrand, model.sde, n_bins=n_bins, n_per_bin=pilot.shape[0], t_min=t_min,
                        defensive=defensive, generator=generator, dtype=x.dtype, device=x.device)
    control = _control_coefficients(pilot_terms["h"].double().cpu().reshape(n_bins, -1),
                                    pilot_terms["w"].double().cpu().reshape(n_bins, -1))
    return EstimatorPlan(plan.proposal, control)


def _round(model, x, active, plan, n_slices, generator):
    """One round of paired draws: (n_slices, B, C) path-term estimates h/q of the classes ``active``
    (B, C) (NaN elsewhere), every class of an image on the same n_slices (t, ε), t stratified over q."""
    batch, num_classes = active.shape
    t, q = plan.proposal.sample(n_slices * batch, generator=generator, device=x.device, dtype=x.dtype,
                                strata=n_slices)
    xs = x.repeat((n_slices,) + (1,) * (x.ndim - 1))
    noise = torch.randn(xs.shape, generator=generator, device=x.device, dtype=x.dtype)
    values = torch.full((n_slices * batch, num_classes), float("nan"), dtype=torch.float64, device=x.device)
    rows_active = active.repeat(n_slices, 1)
    for label in range(num_classes):
        rows = rows_active[:, label].nonzero().flatten()
        if rows.numel():
            h0, w = _class_terms(model, label, xs[rows], t[rows], noise[rows], chunk_size_for(x))
            values[rows, label] = (h0 + plan.control_at(t[rows]) * w) / q[rows].double()
    return values.reshape(n_slices, batch, num_classes)


def _paired(values: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leader (B,), its mean (B,), differences v_c − v_leader (draws, B, C), NaN where c was not drawn)
    of draws ``values`` (draws, B, C): the leader is the active class of highest mean, drawn in every
    round (a class once dropped never returns), so every class has a paired difference to it."""
    means = values.nanmean(0).masked_fill(~active, float("-inf"))
    leader = means.argmax(1)
    lead = values.gather(2, leader[None, :, None].expand(values.shape[0], -1, 1))
    return leader, lead[..., 0].mean(0), values - lead


def _prune(values: torch.Tensor, active: torch.Tensor, z: float) -> torch.Tensor:
    """``active`` without the classes whose paired difference to the image's leader (:func:`_paired`)
    lies below zero by more than ``z`` standard errors: mean(v_c − v_lead) + z·se < 0 (se over the
    draws, counted as independent: the stratified draws of a round are less noisy than that)."""
    leader, _, diff = _paired(values, active)
    n = (~diff.isnan()).sum(0).clamp_min(2)
    mean = diff.nanmean(0)
    se = (((diff - mean) ** 2).nansum(0) / (n - 1)).sqrt() / n.sqrt()
    keep = active & ~(mean + z * se < 0)
    keep[torch.arange(active.shape[0]), leader] = True
    return keep


def class_elbos(model, x: torch.Tensor, *, n_slices: int = 4, time_sampling=None,
                generator: torch.Generator | None = None, t_min: float | None = None, rounds: int = 1,
                z: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ELBO(x | y) in nats for every class y of a class-conditional ``model``, shape (B, C), float64;
    network evaluations per image, (B,)). Each class's ELBO is the ELBO of the model at label y (w = 0)
    with the denoising form of ``time_sampling``'s plan (None: :func:`fit_class_plan` on x), every class
    of an image on the same draws. ``rounds`` > 1: adaptive allocation, ``n_slices`` paired draws per
    round, after each of which an image drops the classes whose paired difference to its leader is
    below zero by more than ``z`` standard errors (:func:`_prune`). Every class's ELBO is the leader's
    mean plus the class's mean paired difference to the leader over the rounds it took part in (with one
    round: its own mean); the rounds' stopping depends on the draws, so with ``rounds`` > 1 the estimates
    are for ranking and Bayes, not unbiased likelihoods."""
    num_classes = _num_classes(model)
    n_slices, rounds = check_positive_int("n_slices", n_slices), check_positive_int("rounds", rounds)
    z = check_positive_float("z", z)
    generator = generator if generator is not None else torch.Generator(x.device).manual_seed(
        int(torch.randint(0, 2 ** 62, (1,))))
    plan = fit_class_plan(model, x, t_min=t_min, generator=generator) if time_sampling is None else time_sampling
    if not isinstance(plan, EstimatorPlan):
        raise ValueError(f"time_sampling must be an EstimatorPlan (fit_class_plan, fit_time_proposal) or None; "
                         f"got {type(plan).__name__}")
    t_min = plan.t_min if t_min is None else check_t_min(t_min, model.T)
    make_proposal(model.sde, plan.proposal, t_min)  # its support starts at t_min
    active = torch.ones(x.shape[0], num_classes, dtype=torch.bool, device=x.device)
    draws, evaluations = [], torch.zeros(x.shape[0], dtype=torch.long)
    for index in range(rounds):
        evaluations += n_slices * active.sum(1).cpu()
        draws.append(_round(model, x, active, plan, n_slices, generator))
        if index + 1 < rounds:
            active = _prune(torch.cat(draws), active, z)
            if bool((active.sum(1) == 1).all()):
                break
    # Each class relative to the leader on the draws they share: the draws' common noise cancels (a
    # dropped class's own mean, over fewer rounds, would carry its rounds' noise, many times larger).
    _, lead_mean, diff = _paired(torch.cat(draws), active)
    path = lead_mean[:, None] + diff.nanmean(0)
    constant = model.sde.expected_prior_log_prob(x).double() + decoder_log_weight(model.sde, x[0].numel(), t_min)
    return path + constant[:, None], evaluations


def classify(model, x: torch.Tensor, *, prior: torch.Tensor | None = None, n_slices: int = 4, time_sampling=None,
             generator: torch.Generator | None = None, t_min: float | None = None, rounds: int = 1,
             z: float = 3.0) -> dict:
    """p(y | x) of a class-conditional ``model`` by Bayes (module docstring) with class ``prior`` p(y)
    (C,) (default uniform), from :func:`class_elbos` (``rounds`` > 1: adaptive allocation). Returns
    {"log_posterior" (B, C), "log_likelihood" (B, C): the paired ELBOs, "prediction" (B,): the most
    probable class, "evaluations" (B,): network evaluations per image}. ValueError for an
    unconditional model or a prior that is not a probability vector of length C."""
    elbos, evaluations = class_elbos(model, x, n_slices=n_slices, time_sampling=time_sampling, generator=generator,
                                     t_min=t_min, rounds=rounds, z=z)
    num_classes = elbos.shape[1]
    if prior is None:
        log_prior = torch.full((num_classes,), -torch.log(torch.tensor(float(num_classes))).item(), dtype=torch.float64)
    else:
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != (num_classes,) or bool((prior < 0).any()) or abs(float(prior.sum()) - 1.0) > 1e-6:
            raise ValueError(f"prior must be {num_classes} non-negative probabilities summing to 1; got {prior.tolist()}")
        log_prior = prior.log()
    log_posterior = torch.log_softmax(elbos + log_prior.to(elbos.device), dim=1)
    return {"log_posterior": log_posterior, "log_likelihood": elbos, "prediction": log_posterior.argmax(dim=1),
            "evaluations": evaluations}


def _by_class(labels: torch.Tensor, num_classes: int):
    for label in range(num_classes):
        index = (labels == label).nonzero().flatten()
        if index.numel():
            yield label, index


def conditional_bpd(model, images: torch.Tensor, labels: torch.Tensor, config: dict, settings=None, *,
                    batch_size: int = 64, seed: int = 0, device=None, every_class: bool = False) -> dict:
    r"""Bits/dim of uint8 ``images`` under a class-conditional ``model`` at their true ``labels``,
    −log₂ p(x | y)/D, and under its null class, −log₂ p(x)/D, on the same images with the same draws
    (:func:`~sdeflow.likelihood.evaluation.evaluate_bpd` with one seed and, for the fitted ELBO, one time
    plan: the null class's, fitted on the first images it scores). Their per-image difference, with its
    paired standard error, estimates the mutual information I(x; y)/D in bits, which lies in
    [0, log₂ C / D] when the null class is the mixture of the classes, :math:`p(x) = \sum_y p(y)\,p(x \mid y)`;
    a null class trained on a share p_uncond of the batches is usually a worse model than that, and the
    difference then also holds its deficit.

    ``every_class``: also every class's bits/dim of every image (C + 1 evaluations instead of 2), and from
    them the mixture's, :math:`-\log_2 \sum_y \hat p(y)\,2^{-D\,b_y}/D` with p̂(y) the labels' frequencies,
    and the information against it (at most log₂ C / D up to the bounds' noise: the model's own I(x; y))
    and the diffusion classifier's accuracy on the images. Returns {"conditional", "unconditional",
    "information": (mean, se) each, "information_bound": log₂ C / D, "n_images", "estimator"} and with
    ``every_class`` "mixture", "mixture_information" (mean, se) and "accuracy"."""
    num_classes = _num_classes(model)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have one entry per image, shape ({images.shape[0]},); got {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    plan = None

    def score(label, index):
        nonlocal plan
        result = evaluate_bpd(guided(model, label), images[index], config, settings, batch_size=batch_size, seed=seed,
                              device=device, plan=plan)
        plan = result["plan"]
        return result["bpd_per_image"].double().cpu(), result["estimator"]

    everything = torch.arange(images.shape[0])
    if every_class:  # every image under every class: the conditional at its label, and the mixture
        unconditional, estimator = score(None, everything)
        by_class = torch.stack([score(label, everything)[0] for label in range(num_classes)], dim=1)
        conditional = by_class[everything, labels]
    else:  # each class's images under their class only
        unconditional, conditional = (torch.zeros(images.shape[0], dtype=torch.float64) for _ in range(2))
        for label, index in _by_class(labels, num_classes):
            unconditional[index], estimator = score(None, index)
            conditional[index] = score(label, index)[0]
    dims = int(torch.tensor(images.shape[1:]).prod())
    result = {"conditional": mean_se(conditional), "unconditional": mean_se(unconditional),
              "information": mean_se(unconditional - conditional), "information_bound": math.log2(num_classes) / dims,
              "n_images": images.shape[0], "estimator": estimator}
    if every_class:
        log2_prior = torch.log2(torch.bincount(labels, minlength=num_classes).double() / labels.numel())
        # log₂ p_mix(x) = log₂ Σ_y p(y) 2^{−D b_y}, in bits per dimension
        mixture = -torch.logsumexp((log2_prior - dims * by_class) * math.log(2), dim=1) / (dims * math.log(2))
        result.update(mixture=mean_se(mixture), mixture_information=mean_se(mixture - conditional),
                      accuracy=float((by_class.argmin(1) == labels).double().mean()))
    return result


def evaluate_classifier(model, images: torch.Tensor, labels: torch.Tensor, config: dict, *, n_slices: int = 4,
                        rounds: int = 1, z: float = 3.0, batch_size: int = 16, seed: int = 0, n_bins: int = 10,
                        plan: EstimatorPlan | None = None) -> dict:
    """The diffusion classifier of a class-conditional ``model`` on uint8 ``images`` with true ``labels``:
    each image dequantized into model space and classified by :func:`classify` (uniform prior; ``rounds``
    of ``n_slices`` paired draws with adaptive allocation at ``z``), with one time ``plan`` for all
    (default: :func:`fit_class_plan` on the first batch from t_σ, the start of ``sdeflow eval``'s
    bound (:func:`~sdeflow.likelihood.evaluation.evaluate_bpd`), its cost counted). Returns {"accuracy", "nll"
    (mean −ln p(true label | x)), "ece" (expected calibration error over ``n_bins`` confidence bins),
    "seconds_per_image", "evaluations_per_image" (network evaluations, the plan's included), "n_images",
    "predictions" (N,), "log_posterior" (N, C)}."""
    images = check_images(images, config)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have one entry per image, shape ({images.shape[0]},); got {tuple(labels.shape)}")
    batch_size = check_positive_int("batch_size", batch_size)
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    started, parts, evaluations = time.perf_counter(), [], 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            generator = make_generator(device, step_seed(seed, start, 0))
            y = preprocess(images[start:start + batch_size].to(device), config["data"], generator, dtype=dtype).y
            with torch.no_grad():  # the denoising form takes no derivative
                if plan is None:  # from t_σ, where sdeflow eval starts the images' bound
                    t_min = max(quantization_time(model.sde, config["data"]), bound_start(model))
                    plan = fit_class_plan(model, y, generator=generator, t_min=t_min)
                    evaluations += PLAN_BINS * min(PLAN_EXAMPLES, y.shape[0]) * _num_classes(model)
                result = classify(model, y, n_slices=n_slices, rounds=rounds, z=z, time_sampling=plan,
                                  generator=generator)
            parts.append(result["log_posterior"].cpu())
            evaluations += int(result["evaluations"].sum())
    finally:
        model.train(was_training)
    log_posterior = torch.cat(parts)
    confidence, predictions = log_posterior.exp().max(dim=1)
    correct = (predictions == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(confidence.double(), edges[1:-1])
    ece = sum(float((bins == b).double().mean() * (confidence.double()[bins == b].mean() - correct[bins == b].mean()).abs())
              for b in range(n_bins) if bool((bins == b).any()))
    return {"accuracy": float(correct.mean()), "nll": float(-log_posterior[torch.arange(len(labels)), labels].mean()),
            "ece": ece, "seconds_per_image": (time.perf_counter() - started) / images.shape[0],
            "evaluations_per_image": evaluations / images.shape[0], "n_images": images.shape[0],
            "predictions": predictions, "log_posterior": log_posterior}
