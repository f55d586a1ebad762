"""The diffusion classifier (sdeflow.likelihood.classifier) on a Gaussian mixture whose components are
the classes, where log p(x | y) and the Bayes posterior are exact."""

import math

import pytest
import torch

import sdeflow
from sdeflow.likelihood.classifier import _prune, class_elbos, classify, fit_class_plan
from sdeflow.likelihood.elbo import fit_time_proposal
from sdeflow.nets.oracles import ClassConditionalScoreNet, GaussianMixture

MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
STDS = torch.tensor([[0.4, 0.6], [0.5, 0.3], [0.35, 0.35]], dtype=torch.float64)
MIXTURE = GaussianMixture(MEANS, STDS)
# With the exact score the ELBO is log p(x | y) up to the prior's mismatch at T: at most 4e-4 nats here
# (measured against the closed form of tests/oracle_helpers.expected_truncated_elbo).
PRIOR_MISMATCH = 1e-3


def _model():
    sde = sdeflow.VPSDE()
    return sdeflow.PluginReverseSDE(sde, ClassConditionalScoreNet(sde, MIXTURE, "noise"), "noise")


def _exact_log_likelihoods(x):
    return torch.stack([GaussianMixture(MEANS[k:k + 1], STDS[k:k + 1]).log_prob(x) for k in range(3)], 1)


def test_paired_class_elbos_give_the_exact_log_likelihood_ratios():
    """E[ELBO(x | j) − ELBO(x | k)] = log p(x | j) − log p(x | k): the differences that decide p(y | x)
    are unbiased."""
    model, x = _model(), MIXTURE.sample(8, torch.Generator().manual_seed(0), torch.float64)
    elbos = torch.stack([class_elbos(model, x, n_slices=8, generator=torch.Generator().manual_seed(r))[0]
                         for r in range(40)])
    ratios = elbos - elbos[..., :1]
    exact = _exact_log_likelihoods(x) - _exact_log_likelihoods(x)[:, :1]
    se = ratios.std(0) / math.sqrt(ratios.shape[0])
    assert ((ratios.mean(0) - exact).abs() <= 5 * se + PRIOR_MISMATCH).all(), (ratios.mean(0) - exact, se)


def _pilot():
    return MIXTURE.sample(16, torch.Generator().manual_seed(5), torch.float64)


def test_every_class_sees_the_same_draws():
    """Paired estimates: column k is the ELBO of the model at label k (sdeflow.elbo with the same plan)
    on the draws that start from the same generator state for every class."""
    model, x = _model(), MIXTURE.sample(4, torch.Generator().manual_seed(1), torch.float64)
    plan = fit_class_plan(model, _pilot(), generator=torch.Generator().manual_seed(0))
    elbos, evaluations = class_elbos(model, x, time_sampling=plan, generator=torch.Generator().manual_seed(7))
    for k in range(3):
        alone = sdeflow.elbo(sdeflow.guided(model, k), x, n_slices=4, time_sampling=plan,
                             generator=torch.Generator().manual_seed(7))
        assert torch.allclose(elbos[:, k], alone.double(), rtol=0, atol=1e-12), k
    assert evaluations.tolist() == [4 * 3] * 4


def test_the_class_plan_lowers_the_noise_of_the_class_differences():
    """fit_class_plan sizes its density by the spread of the integrand across classes: the differences
    ELBO(x | j) − ELBO(x | 0) that decide p(y | x) are less noisy than with the plan of the null class's
    ELBO (measured here: 0.76 of its variance), at the same cost."""
    model, x = _model(), MIXTURE.sample(8, torch.Generator().manual_seed(0), torch.float64)
    plans = {"class": fit_class_plan(model, _pilot(), generator=torch.Generator().manual_seed(1)),
             "null": fit_time_proposal(sdeflow.guided(model, None), _pilot(), generator=torch.Generator().manual_seed(1))}
    variance = {}
    for name, plan in plans.items():
        elbos = torch.stack([class_elbos(model, x, time_sampling=plan, generator=torch.Generator().manual_seed(r))[0]
                             for r in range(100)])
        variance[name] = float((elbos[..., 1:] - elbos[..., :1]).var(0).mean())
    assert variance["class"] < 0.9 * variance["null"], variance


def test_prune_drops_a_class_only_when_clearly_below_the_leader():
    """Per image: the leader (highest mean) stays; a class whose paired differences to it lie z standard
    errors below zero goes; one within its noise stays; a class dropped before stays out."""
    draws = torch.tensor([[10.0, 9.0, 0.0, 5.0], [12.0, 13.0, 2.0, 5.0], [11.0, 10.0, 1.0, 5.0],
                          [9.0, 11.0, -1.0, 5.0]], dtype=torch.float64)[:, None, :]  # (draws, 1 image, 4 classes)
    active = torch.tensor([[True, True, True, False]])
    draws[:, 0, 3] = float("nan")  # class 3 was dropped before these draws
    kept = _prune(draws, active, z=3.0)
    assert kept.tolist() == [[True, True, False, False]]  # 1 leads (mean 10.75), 0 within noise, 2 far below
    assert _prune(draws, active, z=100.0).tolist() == [[True, True, True, False]]


def test_adaptive_allocation_spends_less_and_keeps_the_bayes_class():
    """rounds > 1: after each round an image drops the classes clearly below its leader; the estimates
    stay paired to the leader, so the predictions are those of the Bayes posterior on clear examples, for
    fewer network evaluations than every class in every round."""
    model, x = _model(), MIXTURE.sample(16, torch.Generator().manual_seed(3), torch.float64)
    bayes = torch.softmax(_exact_log_likelihoods(x) + MIXTURE.weights.log(), 1)
    plan = fit_class_plan(model, _pilot(), generator=torch.Generator().manual_seed(0))
    result = classify(model, x, prior=MIXTURE.weights, n_slices=4, rounds=8, time_sampling=plan,
                      generator=torch.Generator().manual_seed(0))
    full = 8 * 4 * 3
    assert result["evaluations"].max() <= full and result["evaluations"].double().mean() < 0.75 * full
    clear = bayes.max(1).values > 0.9
    assert clear.sum() >= 10 and (result["prediction"][clear] == bayes.argmax(1)[clear]).all()
    assert torch.isfinite(result["log_likelihood"]).all()
    with pytest.raises(ValueError, match="rounds must be"):
        classify(model, x, rounds=0)


def test_the_classifier_gives_the_bayes_posterior():
    """Averaged over repeats, p(y | x) is the Bayes posterior π_y N(x; μ_y, σ_y²)/p(x) within the noise of
    the estimate (and a softmax of a noisy log-likelihood is slightly less confident: 0.03 at most here),
    and it predicts the Bayes class wherever that class is clear."""
    model, x = _model(), MIXTURE.sample(12, torch.Generator().manual_seed(2), torch.float64)
    bayes = torch.softmax(_exact_log_likelihoods(x) + MIXTURE.weights.log(), 1)
    runs = [classify(model, x, prior=MIXTURE.weights, n_slices=32, generator=torch.Generator().manual_seed(r))
            for r in range(20)]
    posterior = torch.stack([run["log_posterior"].exp() for run in runs])
    se = posterior.std(0) / math.sqrt(len(runs))
    assert ((posterior.mean(0) - bayes).abs() <= 4 * se + 0.03).all(), (posterior.mean(0), bayes)
    clear = bayes.max(1).values > 0.9
    assert clear.sum() >= 6 and (runs[0]["prediction"][clear] == bayes.argmax(1)[clear]).all()


def test_the_classifier_refuses_an_unconditional_model_and_a_bad_prior():
    net = sdeflow.nets.make_net("mlp", dim=2, hidden=8, n_blocks=1)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="unconditional"):
        classify(sdeflow.PluginReverseSDE(sdeflow.VPSDE(), net, "noise"), x)
    with pytest.raises(ValueError, match="prior must be 3 non-negative probabilities"):
        classify(_model(), x.double(), prior=torch.tensor([0.5, 0.5]))


def _tiny_conditional():
    from training_helpers import TINY_NET, tiny_images, tiny_model
    from sdeflow.experiments.images import image_model_config

    config = image_model_config("toy", "small", net_overrides={**TINY_NET, "num_classes": 3}, in_channels=1,
                                image_size=8)
    model = tiny_model(config)
    with torch.no_grad():  # the output layer starts at zero: give the classes something to differ by
        model.net.conv_out.weight.normal_(0, 0.1)
    return model, config, tiny_images(9), torch.tensor([0, 1, 2] * 3)


def test_conditional_bpd_pairs_each_image_under_its_class_and_the_null_class():
    """conditional_bpd: per class, the images of that class under the model at the class and at the null
    class with one seed; the information is their per-image difference, with its paired standard error."""
    from sdeflow.likelihood.classifier import conditional_bpd
    from sdeflow.likelihood.statistics import mean_se

    model, config, images, labels = _tiny_conditional()
    settings = sdeflow.LikelihoodSettings(time_sampling="importance", n_slices=1)
    result = conditional_bpd(model, images, labels, config, settings, seed=3)
    per_class = [sdeflow.evaluate_bpd(sdeflow.guided(model, k), images[labels == k], config, settings, seed=3)
                 for k in range(3)]
    null = [sdeflow.evaluate_bpd(sdeflow.guided(model, None), images[labels == k], config, settings, seed=3)
            for k in range(3)]
    conditional = torch.cat([r["bpd_per_image"] for r in per_class]).double()
    unconditional = torch.cat([r["bpd_per_image"] for r in null]).double()
    assert result["conditional"] == pytest.approx(mean_se(conditional))
    assert result["information"] == pytest.approx(mean_se(unconditional - conditional))
    assert result["information_bound"] == pytest.approx(math.log2(3) / 64) and result["n_images"] == 9
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conditional_bpd(model, images, torch.full((9,), 3), config, settings)


def test_conditional_bpd_with_the_fitted_elbo_pairs_its_draws_through_one_plan():
    """With the fitted ELBO, both models use one time plan and one seed: the same dequantization, t and
    ε, so the information's paired standard error is far below that of either bits/dim; evaluate_bpd
    with the plan it returned reproduces its result."""
    from sdeflow.likelihood.classifier import conditional_bpd

    model, config, images, labels = _tiny_conditional()
    result = conditional_bpd(model, images, labels, config, seed=3)
    assert result["information"][1] < 0.1 * result["unconditional"][1], result
    first = sdeflow.evaluate_bpd(sdeflow.guided(model, None), images, config, seed=1)
    again = sdeflow.evaluate_bpd(sdeflow.guided(model, None), images, config, seed=1, plan=first["plan"])
    assert torch.equal(first["bpd_per_image"], again["bpd_per_image"]) and again["plan"] is first["plan"]
    with pytest.raises(ValueError, match="plan is the fitted ELBO's"):
        sdeflow.evaluate_bpd(model, images, config, sdeflow.LikelihoodSettings(bound="ode"), plan=first["plan"])


def test_conditional_bpd_of_every_class_gives_the_mixture_and_its_information():
    """every_class: every image under every class on one plan and seed; the conditional bits/dim is the
    column of the true label, the mixture's is −log₂ Σ p̂(y) 2^{−D b_y}/D, whose information lies below
    H(p̂)/D ≤ log₂ C / D for any bounds, and the accuracy is that of the smallest bits/dim."""
    from sdeflow.likelihood.classifier import conditional_bpd
    from sdeflow.likelihood.statistics import mean_se

    model, config, images, labels = _tiny_conditional()
    result = conditional_bpd(model, images, labels, config, seed=3, every_class=True)
    first = sdeflow.evaluate_bpd(sdeflow.guided(model, None), images, config, seed=3)
    columns = torch.stack([sdeflow.evaluate_bpd(sdeflow.guided(model, k), images, config, seed=3,
                                                plan=first["plan"])["bpd_per_image"].double() for k in range(3)], 1)
    assert result["unconditional"] == pytest.approx(mean_se(first["bpd_per_image"].double()))
    assert result["conditional"] == pytest.approx(mean_se(columns[torch.arange(9), labels]))
    mixture = -torch.logsumexp((math.log2(1 / 3) - 64 * columns) * math.log(2), 1) / (64 * math.log(2))
    assert result["mixture"] == pytest.approx(mean_se(mixture))
    assert result["mixture_information"][0] <= result["information_bound"] + 1e-12
    assert result["accuracy"] == pytest.approx(float((columns.argmin(1) == labels).double().mean()))


def test_evaluate_classifier_reports_accuracy_likelihood_and_calibration():
    from sdeflow.likelihood.classifier import evaluate_classifier

    model, config, images, labels = _tiny_conditional()
    result = evaluate_classifier(model, images, labels, config, n_slices=2, batch_size=4)
    posterior = result["log_posterior"].exp()
    assert posterior.shape == (9, 3) and torch.allclose(posterior.sum(1), torch.ones(9, dtype=posterior.dtype))
    assert result["accuracy"] == pytest.approx(float((posterior.argmax(1) == labels).double().mean()))
    assert result["nll"] == pytest.approx(float(-result["log_posterior"][torch.arange(9), labels].mean()))
    assert 0.0 <= result["ece"] <= 1.0 and result["seconds_per_image"] > 0
    assert result["evaluations_per_image"] == pytest.approx((32 * 4 * 3 + 9 * 2 * 3) / 9)  # the plan's pilot, then 2 slices
