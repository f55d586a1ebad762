"""Oracles through the foreign interfaces: the exact score of a Gaussian exposed as a discrete-time
ε(x, n) / x₀ / v network, as a denoiser D(x; σ) and as a score network with score_sde's labels gives,
through each adapter, the closed-form ELBO and ODE likelihood of the model started where the network's
training started (``bound_start``)."""

import math

import pytest
import torch

import sdeflow
from sdeflow.adapters import (adapt_denoiser, adapt_discrete, adapt_score_network, bound_start, load_foreign)
from sdeflow.adapters.discrete import network_output
from sdeflow.sdes.noise_levels import DiscreteVPSDE
from sdeflow.nets.oracles import ExactScoreNet

from oracle_helpers import _one_thread, expected_ode_log_prob, expected_truncated_elbo, gaussian  # noqa: F401

REPEATS = 3000


# ---- funnels: the lead adapts these at merge when the estimators change shape --------------------------
def _elbo(model, x, **kwargs):
    return sdeflow.elbo(model, x, **kwargs)


def _log_prob_ode(model, x, **kwargs):
    return sdeflow.log_prob_ode(model, x, **kwargs)[0]


# ---- the oracle behind each foreign interface ----------------------------------------------------------
class DiscreteOracle(torch.nn.Module):
    """``net(x, timestep)`` at diffusers' index n − 1 of step n: the exact ε, x₀ or v of ``data`` at
    t = nT/N (fractional indices included), optionally with a (meaningless) variance half appended."""

    def __init__(self, sde, data, prediction_type, learned_variance=False):
        super().__init__()
        self.sde, self.prediction_type, self.learned_variance = sde, prediction_type, learned_variance
        self.exact = ExactScoreNet(sde, data, "velocity" if prediction_type == "v_prediction" else "noise")

    def forward(self, x, timestep):
        t = self.sde.step_time(timestep + 1).expand(x.shape[0])
        out = self.exact(x, t)
        if self.prediction_type == "sample":
            m, std = self.sde.mean_weight(t)[:, None], self.sde.std(t)[:, None]
            out = (x - std * out) / m
        return torch.cat([out, torch.full_like(out, 7.0)], dim=1) if self.learned_variance else out


class ExactDenoiser(torch.nn.Module):
    """D(x; σ) = E[x₀ | x₀ + σ n = x] = x + σ² ∇log p_σ(x) of ``data``."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def forward(self, x, sigma):
        return x + sigma[:, None] ** 2 * self.data.score(x, 1.0, sigma ** 2).to(x.dtype)


class LabelledOracle(torch.nn.Module):
    """``net(x, label)`` with score_sde's label of t: "ddpm" (N−1)t/T → ε̂, "sigma" σ̃ → s."""

    def __init__(self, sde, data, labels, n_labels=1000):
        super().__init__()
        self.sde, self.labels, self.n_labels = sde, labels, n_labels
        self.exact = ExactScoreNet(sde, data, "noise" if labels == "ddpm" else "score")

    def forward(self, x, label):
        if self.labels == "ddpm":
            t = label.double() * self.sde.T / (self.n_labels - 1)
        else:
            t = self.sde.t_from_log_snr(-2 * torch.log(label.double()))
        return self.exact(x, t)


def _discrete_model(prediction_type="epsilon", learned_variance=False, keep_variance=False):
    sde, data = DiscreteVPSDE("linear", 1e-3, 0.3, 40), gaussian()
    return adapt_discrete(DiscreteOracle(sde, data, prediction_type, learned_variance), sde, prediction_type,
                          learned_variance=keep_variance).double()


def _cases():
    data = gaussian()
    denoiser = adapt_denoiser(ExactDenoiser(data), sigma_min=0.01, sigma_max=30.0).double()
    ddpm_sde, ve_sde = sdeflow.VPSDE(0.1, 20.0), sdeflow.VESDE(0.01, 50.0)
    return {
        "epsilon": _discrete_model("epsilon"),
        "v_prediction": _discrete_model("v_prediction"),
        "sample-learned-variance": _discrete_model("sample", learned_variance=True),
        "sample-learned-range-kept": _discrete_model("sample", learned_variance=True, keep_variance=True),
        "denoiser": denoiser,
        "score-ddpm": adapt_score_network(LabelledOracle(ddpm_sde, data, "ddpm"), ddpm_sde, "ddpm", "noise").double(),
        "score-sigma": adapt_score_network(LabelledOracle(ve_sde, data, "sigma"), ve_sde, "sigma", "score").double(),
    }


CASES = _cases()


@pytest.mark.parametrize("case", CASES)
def test_elbo_through_the_adapter_is_the_closed_form(case):
    model, data = CASES[case], gaussian()
    x = data.sample(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_min = bound_start(model) or 1e-3
    gen = torch.Generator().manual_seed(1)
    values = _elbo(model, x.repeat(REPEATS, 1), time_sampling="importance", t_min=t_min, generator=gen)
    values = values.reshape(REPEATS, x.shape[0])
    mean, se = values.mean(0), values.std(0) / math.sqrt(REPEATS)
    expected = expected_truncated_elbo(model.sde, data, x, t_min)
    assert ((mean - expected).abs() < 5 * se + 1e-3).all(), (mean, expected, se)


@pytest.mark.parametrize("case", CASES)
def test_ode_likelihood_through_the_adapter_is_the_closed_form(case):
    model, data = CASES[case], gaussian()
    x = data.sample(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_min = bound_start(model) or 1e-3
    logp = _log_prob_ode(model, x, t_min=t_min, divergence="exact")
    assert (logp - expected_ode_log_prob(model.sde, data, x, t_min)).abs().max() < 1e-3 * data.dim


def test_bound_start_is_the_first_trained_noise_level():
    assert bound_start(CASES["epsilon"]) == pytest.approx(1 / 40)
    denoiser = CASES["denoiser"]
    t = torch.tensor(bound_start(denoiser), dtype=torch.float64)
    assert float(denoiser.sde.std(t)) == pytest.approx(0.01, rel=1e-12)
    assert float(denoiser.sde.std(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(30.0, rel=1e-12)
    assert bound_start(CASES["score-ddpm"]) == 0.0


def test_a_learned_range_is_kept_as_the_models_variance_head():
    """improved DDPM's / diffusers' "learned_range": the other C channels r give v = (r + 1)/2 between
    log β̃ and log β (the oracle's r = 7, so v = 4); the mean and where the bound starts are unchanged."""
    from sdeflow.discrete import LearnedVariance, forward_chain

    model, plain = CASES["sample-learned-range-kept"], CASES["sample-learned-variance"]
    assert bound_start(model) == bound_start(plain) == pytest.approx(1 / 40)
    chain, n = forward_chain(model.sde, chain_steps=40), torch.tensor([2, 20, 40])
    y, t = torch.randn(3, 3, dtype=torch.float64), chain.times[n]
    torch.testing.assert_close(model.predicted_noise(y, t), plain.predicted_noise(y, t))
    var = LearnedVariance.of(model).variance(chain, n, y)
    expected = torch.exp(4 * chain.step_var[n].log() + (1 - 4) * chain.posterior_var[n].log())[:, None]
    torch.testing.assert_close(var, expected.expand_as(y))
    with pytest.raises(ValueError, match="twice the channels"):
        _discrete_model("epsilon", keep_variance=True).predicted_noise(y, t)


def test_discrete_network_is_called_at_integer_indices_on_the_steps():
    seen = []

    def net(x, timestep):
        seen.append(timestep)
        return torch.zeros_like(x)

    sde = DiscreteVPSDE(num_train_timesteps=1000)
    model = adapt_discrete(net, sde)
    model.predicted_noise(torch.zeros(3, 2, dtype=torch.float64), sde.step_time(torch.tensor([1, 500, 1000])))
    assert seen[0].tolist() == [0.0, 499.0, 999.0]
    model.predicted_noise(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0.0105], dtype=torch.float64))
    assert seen[1].tolist() == [pytest.approx(9.5)]


def test_a_class_conditional_discrete_network_gets_its_labels():
    """num_classes > 0: the network is called with class_labels= (diffusers' keyword); a null class only
    where the network has one (null_class), else guidance and the unconditional model are refused."""
    seen = []

    def net(x, timestep, class_labels=None):
        seen.append(class_labels)
        return torch.zeros_like(x) + class_labels[:, None]

    y, t = torch.zeros(2, 2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    model = adapt_discrete(net, DiscreteVPSDE(), num_classes=4)
    assert model.net.num_classes == 4 and not model.net.has_null_class
    out = sdeflow.guided(model, torch.tensor([3, 1])).predicted_noise(y, t)
    assert seen[-1].tolist() == [3, 1] and out[:, 0].tolist() == [3.0, 1.0]
    for call, message in ((lambda: sdeflow.guided(model, 2, 1.0), "no null class"),
                          (lambda: sdeflow.guided(model, None), "no null class"),
                          (lambda: model.predicted_noise(y, t), "no null class"),
                          (lambda: sdeflow.guided(model, 4), r"labels must lie in \[0, 3\]"),
                          (lambda: sdeflow.guided(model, 5), r"labels must lie in \[0, 4\]")):
        with pytest.raises(ValueError, match=message):
            call()
    with_null = adapt_discrete(net, DiscreteVPSDE(), num_classes=3, null_class=True)
    guided = sdeflow.guided(with_null, 1, 2.0).predicted_noise(y, t)
    assert seen[-1].tolist() == [1, 1, 3, 3] and guided[:, 0].tolist() == [3 * 1.0 - 2 * 3.0] * 2
    with pytest.raises(ValueError, match="labels were given to an unconditional network"):
        adapt_discrete(lambda x, timestep: x, DiscreteVPSDE()).net(y, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="null_class needs a class-conditional network"):
        adapt_discrete(net, DiscreteVPSDE(), null_class=True)


def test_ncsn_labels_index_the_decreasing_sigmas():
    labels = []
    sde = sdeflow.VESDE(0.01, 50.0)
    model = adapt_score_network(lambda x, label: labels.append(label) or torch.zeros_like(x), sde, "ncsn",
                                n_labels=11)
    model.score(torch.zeros(3, 2), torch.tensor([1.0, 0.5, 0.0]))
    assert labels[0].dtype == torch.long and labels[0].tolist() == [0, 5, 10]


def test_network_output_refuses_a_wrong_shape():
    like = torch.zeros(2, 3, 4, 4)
    assert network_output(torch.ones(2, 6, 4, 4), like).shape == like.shape
    with pytest.raises(ValueError, match="shaped like"):
        network_output(torch.ones(2, 5, 4, 4), like)


@pytest.mark.parametrize("kwargs, word", [
    (dict(prediction_type="x0"), "prediction_type"), (dict(sde=sdeflow.VPSDE()), "sde")])
def test_adapt_discrete_refuses_bad_input(kwargs, word):
    arguments = dict(net=torch.nn.Identity(), sde=DiscreteVPSDE(), prediction_type="epsilon") | kwargs
    with pytest.raises(ValueError, match=word):
        adapt_discrete(**arguments)


def test_load_foreign_refuses_an_unknown_source_and_names_the_extra(monkeypatch):
    with pytest.raises(ValueError, match="SOURCE:LOCATION"):
        load_foreign("huggingface:google/ddpm-cifar10-32")
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install sdeflow\[diffusers\]"):
        load_foreign("diffusers:google/ddpm-cifar10-32")


# ---- loading a diffusers folder: safetensors only unless allowed, one line of error, quietly ----------
def _save_diffusers_pipeline(folder, **save_options):
    """A tiny UNet2DModel and its DDPMScheduler, saved as a pipeline folder; returns the UNet."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        folder, **save_options)
    return unet


def test_load_foreign_reads_pickled_weights_only_when_allowed(tmp_path, capfd):
    """A folder saved with safe_serialization=False (diffusion_pytorch_model.bin) is refused by default,
    naming the keyword that allows it; with allow_pickle=True it loads, the same network, and diffusers
    says nothing on the way (no accelerate advice, no "unsafe serialization" notice)."""
    from diffusers.utils import logging as diffusers_logging

    from sdeflow.adapters import PickledWeightsError

    unet = _save_diffusers_pipeline(tmp_path / "pipe", safe_serialization=False)
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin").is_file()
    verbosity = diffusers_logging.get_verbosity()
    with pytest.raises(PickledWeightsError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        load_foreign(f"diffusers:{tmp_path / 'pipe'}")
    model, config = load_foreign(f"diffusers:{tmp_path / 'pipe'}", allow_pickle=True)
    assert config["net"]["image_size"] == 8
    y, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.allclose(model.predicted_noise(y, t), unet(y, model.sde.timestep(t)).sample, atol=1e-6)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert diffusers_logging.get_verbosity() == verbosity  # restored after the load


@pytest.mark.parametrize("weights", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_load_foreign_reports_a_corrupt_weights_file_in_one_line(tmp_path, capfd, weights):
    """The first real error (the weights file does not parse) is the one reported, in one line: not the
    fallback's "no file named config.json" of the folder above the part."""
    _save_diffusers_pipeline(tmp_path / "pipe", safe_serialization=weights.endswith(".safetensors"))
    (tmp_path / "pipe" / "unet" / weights).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as caught:
        load_foreign(f"diffusers:{tmp_path / 'pipe'}", allow_pickle=True)
    message = str(caught.value)
    assert "Unable to load weights from checkpoint file" in message and weights in message
    assert "config.json" not in message and "\n" not in message
    assert capfd.readouterr().err == ""


def test_load_foreign_never_looks_up_a_local_path_on_the_hub(tmp_path, monkeypatch):
    """A path that is not a folder is refused at once, and a folder is read with local_files_only."""
    diffusers = pytest.importorskip("diffusers")

    calls = []
    original = diffusers.UNet2DModel.from_pretrained

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_foreign(f"diffusers:{tmp_path / 'missing'}")
    _save_diffusers_pipeline(tmp_path / "pipe")
    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", recorded)
    load_foreign(f"diffusers:{tmp_path / 'pipe'}")
    assert calls and all(call.get("local_files_only") and call.get("use_safetensors") for call in calls)
