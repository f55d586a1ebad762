"""The diffusion classifier (sdeflow.likelihood.classifier) on a Gaussian mixture whose components are
the classes, where log p(x | y) and the Bayes posterior are exact."""

import math

import pytest
import torch

import sdeflow
from sdeflow.likelihood.classifier import class_elbos, classify
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
    elbos = torch.stack([class_elbos(model, x, n_slices=8, generator=torch.Generator().manual_seed(r))
                         for r in range(40)])
    ratios = elbos - elbos[..., :1]
    exact = _exact_log_likelihoods(x) - _exact_log_likelihoods(x)[:, :1]
    se = ratios.std(0) / math.sqrt(ratios.shape[0])
    assert ((ratios.mean(0) - exact).abs() <= 5 * se + PRIOR_MISMATCH).all(), (ratios.mean(0) - exact, se)


def test_every_class_sees_the_same_draws():
    """Paired estimates: column k is the ELBO of the model at label k on the draws that start from the
    same generator state for every class, with one shared time proposal."""
    model, x = _model(), MIXTURE.sample(4, torch.Generator().manual_seed(1), torch.float64)
    proposal = sdeflow.ImportanceTime(model.sde, t_min=1e-5)
    elbos = class_elbos(model, x, time_sampling=proposal, generator=torch.Generator().manual_seed(7))
    for k in range(3):
        alone = sdeflow.elbo(sdeflow.guided(model, k), x, n_slices=4, time_sampling=proposal,
                             generator=torch.Generator().manual_seed(7))
        assert torch.equal(elbos[:, k], alone.double()), k


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


def test_evaluate_classifier_reports_accuracy_likelihood_and_calibration():
    from sdeflow.likelihood.classifier import evaluate_classifier

    model, config, images, labels = _tiny_conditional()
    result = evaluate_classifier(model, images, labels, config, n_slices=2, batch_size=4)
    posterior = result["log_posterior"].exp()
    assert posterior.shape == (9, 3) and torch.allclose(posterior.sum(1), torch.ones(9, dtype=posterior.dtype))
    assert result["accuracy"] == pytest.approx(float((posterior.argmax(1) == labels).double().mean()))
    assert result["nll"] == pytest.approx(float(-result["log_posterior"][torch.arange(9), labels].mean()))
    assert 0.0 <= result["ece"] <= 1.0 and result["seconds_per_image"] > 0
