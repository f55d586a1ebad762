"""sdeflow.evaluation: log-likelihoods over data sets against closed forms, reproducibility, and
the promise that `sdeflow eval` never loads the training loop."""

import subprocess
import sys

import pytest
import torch

from sdeflow.data import get_dataset
from sdeflow.evaluation import EvaluationError, log_likelihood, mean_se

from oracle_helpers import SDES, exact_model, expected_elbo, expected_ode_log_prob, gaussian
from sdeflow.experiments import images as images_app
from sdeflow.experiments.images import image_model_config

from training_helpers import REPO, TINY_NET, cli_env, tiny_model, tiny_train_config, write_cifar_batches


@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_elbo_and_ode_over_batches_match_the_closed_forms(sde_name):
    sde, data = SDES[sde_name](), gaussian(3)
    model = exact_model(sde, data)
    x = data.sample(300, generator=torch.Generator().manual_seed(0)).double()
    elbo = log_likelihood(model, x, n_slices=4, divergence="exact", batch_size=64, seed=1)
    exact = float(expected_elbo(sde, data, x).mean())
    assert elbo["n"] == 300 and elbo["per_example"].shape == (300,)
    assert abs(elbo["mean"] - exact) < 4 * elbo["se"] + 1e-6
    assert (elbo["mean"], elbo["se"]) == pytest.approx(mean_se(elbo["per_example"]))
    ode = log_likelihood(model, x[:40], estimator="ode", divergence="exact", batch_size=16, rtol=1e-6, atol=1e-6)
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
    with pytest.raises(ValueError, match="estimator must be one of"):
        log_likelihood(model, x, estimator="iwae")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        log_likelihood(model, x, batch_size=0)
    with pytest.raises(ValueError, match="either x"):
        log_likelihood(model)
    broken = torch.nn.Linear(2, 2)
    with torch.no_grad():
        broken.weight.fill_(float("nan"))
    model.register_module("broken", broken)
    with pytest.raises(EvaluationError, match="non-finite parameters"):
        log_likelihood(model, x)


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
