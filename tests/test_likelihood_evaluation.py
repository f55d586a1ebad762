"""sdeflow.likelihood.evaluation: log-likelihoods over data sets against closed forms, reproducibility, and
the promise that `sdeflow eval` never loads the training loop."""

import math
import subprocess
import sys

import pytest
import torch

import sdeflow
from sdeflow import LikelihoodSettings
from sdeflow.data import get_dataset
from sdeflow.data.transforms import truncated_normal_scale
from sdeflow.likelihood.evaluation import (EvaluationError, evaluate_bpd, log_likelihood,
                                quantization_time)
from sdeflow.sdes import noise_level_time
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture
from sdeflow.likelihood.statistics import mean_se, tail_diagnostics

from oracle_helpers import SDES, exact_model, expected_elbo, expected_ode_log_prob, gaussian
from sdeflow.experiments import images as images_app
from sdeflow.experiments.images import image_model_config

from training_helpers import REPO, TINY_NET, cli_env, tiny_model, tiny_train_config, write_cifar_batches


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("transform", ["logit", "centered"])
def test_quantization_time_is_where_the_noise_level_is_the_quantization_scale(name, transform):
    sde = SDES[name]()
    sigma = truncated_normal_scale(transform, 0.05)
    t = quantization_time(sde, {"transform": transform, "alpha": 0.05})
    assert t == noise_level_time(sde, sigma) and 0 < t < 0.05 * sde.T
    t = torch.tensor(t, dtype=torch.float64)
    assert float(sde.std(t) / sde.mean_weight(t)) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_elbo_and_ode_over_batches_match_the_closed_forms(sde_name):
    sde, data = SDES[sde_name](), gaussian(3)
    model = exact_model(sde, data)
    x = data.sample(300, generator=torch.Generator().manual_seed(0)).double()
    elbo = log_likelihood(model, x, batch_size=64, seed=1, settings=LikelihoodSettings(n_slices=4, divergence="exact"))
    exact = float(expected_elbo(sde, data, x).mean())
    assert elbo["n"] == 300 and elbo["per_example"].shape == (300,)
    assert abs(elbo["mean"] - exact) < 4 * elbo["se"] + 1e-6
    assert (elbo["mean"], elbo["se"]) == pytest.approx(mean_se(elbo["per_example"]))
    ode = log_likelihood(model, x[:40], batch_size=16, settings=LikelihoodSettings(bound="ode", divergence="exact", rtol=1e-6, atol=1e-6))
    assert ode["mean"] == pytest.approx(float(expected_ode_log_prob(sde, data, x[:40]).mean()), abs=2e-3)
    assert ode["nfe"] > 0


def test_results_are_reproducible_for_a_seed_and_change_with_it():
    sde, data = SDES["vp"](), gaussian(3)
    model = exact_model(sde, data)
    x = data.sample(50, generator=torch.Generator().manual_seed(1)).double()
    first = log_likelihood(model, x, batch_size=20, seed=3)
    again = log_likelihood(model, x, batch_size=20, seed=3)
    other = log_likelihood(model, x, batch_size=20, seed=4)
    assert torch.equal(first["per_example"], again["per_example"])
    assert not torch.equal(first["per_example"], other["per_example"])


def test_bad_arguments_and_diverged_models():
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    x = data.sample(4).double()
    with pytest.raises(ValueError, match="bound must be one of"):
        log_likelihood(model, x, settings=LikelihoodSettings(bound="iwae"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        log_likelihood(model, x, batch_size=0)
    with pytest.raises(ValueError, match=r"t_min must lie in \[0, T=1.0\)"):  # before any pilot fit
        log_likelihood(model, x, settings=LikelihoodSettings(t_min=2.0))
    with pytest.raises(ValueError, match="either x"):
        log_likelihood(model)
    broken = torch.nn.Linear(2, 2)
    with torch.no_grad():
        broken.weight.fill_(float("nan"))
    model.register_module("broken", broken)
    with pytest.raises(EvaluationError, match="non-finite parameters"):
        log_likelihood(model, x)


def test_results_carry_the_estimator_and_the_tail_diagnostics():
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    x = data.sample(40, generator=torch.Generator().manual_seed(2)).double()
    elbo = log_likelihood(model, x, batch_size=16, settings=LikelihoodSettings(n_slices=1, fit_examples=64))
    assert elbo["estimator"] == LikelihoodSettings(n_slices=1, t_min=1e-5).describe(fit_examples=40) == (
        "ELBO from t_min 1e-05 (Gaussian decoder), time proposal fitted on 40 pilot examples (denoising form "
        "with a fitted control variate), 1 slice per example")
    assert {k: elbo[k] for k in ("tail_share", "tail_count", "kurtosis", "heavy_tailed")} == tail_diagnostics(
        elbo["per_example"])
    ode = log_likelihood(model, x[:4], settings=LikelihoodSettings(bound="ode", divergence="exact", rtol=1e-3,
                                                                   atol=1e-4, solver="bosh3"))
    assert ode["estimator"] == "probability-flow ODE from t_min 0, bosh3, rtol 0.001, atol 0.0001, exact divergence"
    assert LikelihoodSettings(time_sampling="importance", divergence="exact").describe(T=2.0) == (
        "ELBO from t_min 2e-05 (Gaussian decoder), importance time proposal q ∝ g²/v, exact divergence, "
        "4 slices per example")
    assert LikelihoodSettings(time_sampling="uniform", probe="gaussian", t_min=0).describe().startswith(
        "ELBO from t_min 0, uniform time, Hutchinson divergence (gaussian probe)")
    with pytest.raises(ValueError, match="solver must be one of"):
        log_likelihood(model, x, settings=LikelihoodSettings(bound="ode", solver="euler"))  # fixed grid: no tolerances


def test_ode_standard_error_counts_each_examples_own_probe_noise():
    """For N(μ, diag σ²) data the flow is linear per coordinate, y_i(t) − m μ_i ∝ s_i(t) with
    s_i² = m² σ_i² + v, so ∫₀ᵀ ∇·v dt = Σ_i M_i with M_i = log(s_i(T)/σ_i). A Gaussian probe z
    gives Σ_i M_i z_i² instead: an error of mean 0 and variance 2 Σ_i M_i², independent between
    examples if each has its own probe. So the Hutchinson estimates' variance is the exact ones'
    plus 2 Σ M², and the standard error of their mean carries the probe noise."""
    sde, data = SDES["vp"](), gaussian(3)
    model = exact_model(sde, data)
    x = data.sample(800, generator=torch.Generator().manual_seed(0)).double()
    exact = log_likelihood(model, x, batch_size=400, settings=LikelihoodSettings(bound="ode", divergence="exact"))
    hutch = log_likelihood(model, x, batch_size=400, seed=3, settings=LikelihoodSettings(bound="ode", probe="gaussian"))
    T = torch.tensor(sde.T, dtype=torch.float64)
    std = torch.linspace(0.3, 1.0, 3, dtype=torch.float64)  # gaussian(3)'s
    log_spread = 0.5 * torch.log((sde.mean_weight(T) ** 2 * std ** 2 + sde.var(T)) / std ** 2)  # M_i
    probe_variance = float(2 * (log_spread ** 2).sum())
    error = hutch["per_example"] - exact["per_example"]
    n = error.numel()
    assert abs(float(error.mean())) < 4 * math.sqrt(probe_variance / n)
    centred = error - error.mean()
    variance_se = math.sqrt(float((centred ** 4).mean() - (centred ** 2).mean() ** 2) / n)
    assert abs(float(error.var()) - probe_variance) < 4 * variance_se
    pairs = error.reshape(2, 400)  # neighbours in one batch: independent probes, uncorrelated errors
    correlation = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(), pairs[:, 1:].flatten()]))[0, 1]
    assert abs(float(correlation)) < 4 / math.sqrt(n)
    assert hutch["se"] ** 2 * n == pytest.approx(exact["se"] ** 2 * n + probe_variance, rel=0.2)


def test_eval_command_never_imports_the_training_loop(tmp_path):
    root = write_cifar_batches(tmp_path / "data", n_train=8, n_test=4)
    config = image_model_config("cifar10", "small", net_overrides=TINY_NET)
    images_app.train_images(tiny_model(config), get_dataset("cifar10").load(root, "train"), tmp_path / "run",
                            tiny_train_config(steps=1, checkpoint_every=1), config)
    script = ("import sys\nfrom sdeflow.cli import main\n"
              "code = main(['eval', '--checkpoint', sys.argv[1], '--dataset', 'cifar10', '--data-root', sys.argv[2],"
              " '--limit', '2', '--time-sampling', 'importance', '--no-progress'])\n"
              "assert code == 0, code\n"
              "print(sorted(m for m in sys.modules if m.startswith(('sdeflow.engine.loop', 'sdeflow.engine.batches'))))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(root)], capture_output=True,
                            text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test bits/dim" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


class _FlatNet(torch.nn.Module):
    """A (B, D) network applied to (B, C, H, W) images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, t):
        return self.net(y.flatten(1), t).reshape(y.shape)


@pytest.mark.parametrize("ode", [False, True])
def test_bits_per_dim_bound_the_exact_probability_of_the_discrete_images(ode):
    """For a model whose data density is Gaussian in model space, P(k) of an 8-bit image is a product
    of normal masses over the pixels' bins. Every estimate (ELBO or ODE, uniform or truncated-normal
    dequantization) is an upper bound on −log₂ P(k)/D; uniform dequantization is tight for a density
    this smooth, and the truncated normal pays about KL(q ‖ uniform) per pixel."""
    from scipy.stats import norm

    from sdeflow.data.transforms import Preprocess
    from sdeflow.experiments.images import image_model_config

    config = image_model_config("toy", "small", in_channels=1, image_size=4)
    sde, data = SDES["vp"](), GaussianMixture.gaussian(torch.full((16,), 0.2), torch.full((16,), 1.5))
    model = sdeflow.PluginReverseSDE(sde, _FlatNet(ExactScoreNet(sde, data, "score")), "score").double()
    images = torch.randint(0, 256, (48, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    # the model's density of y is its marginal at t_σ, rescaled: N(μ, s² + v/m²)
    t_min = quantization_time(sde, config["data"])
    t = torch.tensor(t_min, dtype=torch.float64)
    std = math.sqrt(1.5 ** 2 + float(sde.var(t) / sde.mean_weight(t) ** 2))
    edges = Preprocess(config["data"]["transform"], config["data"]["alpha"]).forward(
        torch.arange(257, dtype=torch.float64)[None] / 256)[0][0]
    k = images.flatten(1).long()
    log_mass = torch.log(torch.from_numpy(norm.cdf((edges[k + 1] - 0.2).numpy() / std)
                                          - norm.cdf((edges[k] - 0.2).numpy() / std)))
    exact = -log_mass.sum(1) / (16 * math.log(2))
    options = dict(bound="ode", rtol=1e-6, atol=1e-6) if ode else dict()
    for dequantization, gap in (("uniform", 0.01), ("truncated-normal", 2.0)):
        settings = LikelihoodSettings(dequantization=dequantization, **options)
        result = evaluate_bpd(model, images, config, settings, batch_size=16)
        difference = result["bpd_per_image"] - exact
        mean, se = float(difference.mean()), float(difference.std() / math.sqrt(48))
        assert mean > -5 * se - 1e-4, (dequantization, mean, se)
        assert mean < gap, (dequantization, mean)


def test_the_discrete_bound_of_evaluate_bpd_is_discrete_bound_on_the_pixels_bins():
    """evaluate_bpd(bound="discrete") scores each image's bins (no dequantization) with the bound of
    sdeflow.discrete, in bits: −log P(x)/(D ln 2), on the same draws for the same seed."""
    from sdeflow.discrete import PixelBins, discrete_bound, forward_chain
    from sdeflow.engine.state import STREAM_EVAL, make_generator, step_seed

    config = image_model_config("toy", "small", in_channels=1, image_size=4)
    sde, data = SDES["vp"](), GaussianMixture.gaussian(torch.full((16,), 0.2), torch.full((16,), 1.5))
    model = sdeflow.PluginReverseSDE(sde, _FlatNet(ExactScoreNet(sde, data, "score")), "score").double()
    images = torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for variance in ("posterior", "step"):
        settings = LikelihoodSettings(bound="discrete", chain_steps=50, variance=variance)
        result = evaluate_bpd(model, images, config, settings, batch_size=6, seed=3)
        bins = PixelBins(config["data"]["transform"], config["data"]["alpha"])
        direct = discrete_bound(model, bins.centre(images).float(), forward_chain(sde, chain_steps=50), variance,
                                bins=bins, generator=make_generator("cpu", step_seed(3, 0, 0, stream=STREAM_EVAL)))
        torch.testing.assert_close(result["bpd_per_image"], direct.bits_per_dim().double())
        assert result["nfe"] == 50 and "discretized Gaussian decoder" in result["estimator"]
    with pytest.raises(ValueError, match="variance 'analytic' needs its value"):
        evaluate_bpd(model, images, config, LikelihoodSettings(bound="discrete", variance="analytic"))
