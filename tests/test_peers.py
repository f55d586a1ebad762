"""sdeflow's samplers and likelihoods on adapted foreign models against the peers' own loops, on the same
small random-initialised networks in float64, the same x_T and the same noise levels. Skipped when a peer
(diffusers, k-diffusion installed with ``pip install --no-deps k-diffusion``) is absent."""

import importlib.util
import math
import sys
import types

import pytest
import torch

import sdeflow
from sdeflow.adapters import adapt_denoiser, adapt_diffusers, bound_start, load_foreign
from sdeflow.samplers import METHODS, ClippedModel

from oracle_helpers import _one_thread  # noqa: F401  (one intra-op thread for these small batches)


# ---- funnels: the lead adapts these at merge when the estimators and samplers change shape ----------
def _sample(model, x_T, method, **kwargs):
    return sdeflow.sample(model, x_T.shape, sdeflow.SamplerSettings(method=method, **kwargs), x_T=x_T)


def _log_prob_ode(model, x, **kwargs):
    return sdeflow.log_prob_ode(model, x, **kwargs)[0]


def _sample_on_times(model, x, method, times, lmbd=1.0, options=None, generator=None):
    """``method``'s steps on the explicit decreasing times ``times``, from ``x``."""
    settings = sdeflow.SamplerSettings(method=method, lmbd=lmbd, options=options or {})
    return sdeflow.sample(model, x.shape, settings, x_T=x, times=times, generator=generator)


# ---- diffusers ---------------------------------------------------------------------------------------
def _unet(out_channels=3):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double().eval()


def _diffusers_loop(unet, scheduler, x, n_steps, **step_kwargs):
    scheduler.set_timesteps(n_steps)
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step).sample, step, x, **step_kwargs).prev_sample
    return x, scheduler.timesteps


# diffusers computes its schedules' coefficients in float32 (√ᾱ of a float32 ᾱ): agreement to float32's
# rounding, relative to the size of the samples.
FLOAT32_AGREEMENT = 1e-6


def _assert_close(ours, expected, relative):
    error = float((ours - expected).abs().max())
    assert error <= relative * float(expected.abs().max()), f"max error {error:.3g} of {float(expected.abs().max()):.3g}"


def _x_T(shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddim_equals_diffusers_ddim_trailing(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    unet = _unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=False,
                                        set_alpha_to_one=True, timestep_spacing="trailing")
    expected, _ = _diffusers_loop(unet, scheduler, _x_T(), 10)
    model = adapt_diffusers(unet, scheduler)
    ours = _sample(model, _x_T(), "ddim", n_steps=10, grid="uniform", t_min=0.0, lmbd=1.0)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)


def _leading(sde, n_steps, t_start, t_min, num_train_timesteps=1000):
    """diffusers' "leading" spacing as a registered grid: of n_steps + 1 network evaluations at steps
    0, c, …, n_steps·c (c = N // (n_steps + 1)), the times t = (step + 1)/N of a discrete model."""
    steps = torch.arange(n_steps, -1, -1, dtype=torch.float64) * (num_train_timesteps // (n_steps + 1))
    return sde.step_time(steps + 1)


@pytest.fixture
def leading_grid():
    from sdeflow.samplers.grids import GRIDS

    sdeflow.register_grid("leading", _leading, description="diffusers' leading spacing")
    yield "leading"
    del GRIDS["leading"]


def test_ddim_equals_diffusers_ddim_leading(leading_grid):
    """diffusers' default spacing starts below T (900, 800, …, 0 of 1000) and ends on ᾱ_0 = ᾱ_1 without
    set_alpha_to_one: t_n = (step + 1)/N, and its last step (from ᾱ_1 to ᾱ_0 = ᾱ_1) leaves x as it is.
    sdeflow reaches it through a registered grid of 9 steps and through sample(times=...)."""
    diffusers = pytest.importorskip("diffusers")
    unet = _unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    expected, steps = _diffusers_loop(unet, scheduler, _x_T(), 10)
    model = adapt_diffusers(unet, scheduler)
    times = model.sde.step_time(steps + 1)
    assert float(times[-1]) == pytest.approx(bound_start(model))
    ours = _sample_on_times(model, _x_T(), "ddim", times)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)
    settings = sdeflow.SamplerSettings(method="ddim", n_steps=9, grid=leading_grid, lmbd=1.0)
    assert torch.equal(sdeflow.sample(model, _x_T().shape, settings, x_T=_x_T()), ours)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dpmpp_2m_equals_diffusers_dpm_solver_multistep(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    unet = _unet()
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        prediction_type=prediction_type, timestep_spacing="trailing", final_sigmas_type="zero")
    expected, _ = _diffusers_loop(unet, scheduler, _x_T(), 8)
    model = adapt_diffusers(unet, scheduler)
    ours = _sample(model, _x_T(), "dpm++2m", n_steps=8, grid="uniform", t_min=0.0)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)


def _ddpm_and_ancestral(variance_type, wrap=lambda model: model, **scheduler_kwargs):
    """(diffusers' DDPMScheduler samples, sdeflow's "ancestral" samples of ``wrap(model)``) of 10 of 1000
    steps from the same x_T with the same noise draws."""
    diffusers = pytest.importorskip("diffusers")
    unet = _unet(6 if variance_type == "learned_range" else 3)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, **scheduler_kwargs)
    scheduler.set_timesteps(10)
    x, generator = _x_T(), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step).sample, step, x, generator=generator).prev_sample
    model = adapt_diffusers(unet, scheduler)
    times = torch.cat([model.sde.step_time(scheduler.timesteps + 1), torch.zeros(1, dtype=torch.float64)])
    variance = {"fixed_small": "posterior", "fixed_large": "step", "learned_range": "learned"}[variance_type]
    with torch.no_grad():
        ours = _sample_on_times(wrap(model), _x_T(), "ancestral", times, lmbd=0.0, options={"variance": variance},
                                generator=torch.Generator().manual_seed(5))
    return x, ours


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ancestral_equals_diffusers_ddpm_on_respaced_steps(variance_type):
    """DDPMScheduler's 10 of 1000 steps (leading spacing: 900, 800, …, 0, each step on the respaced β)
    and sdeflow's "ancestral" method on the same times with the same noise draws: β̃, β, and improved
    DDPM's learned range read from a UNet's extra channels by adapt_diffusers."""
    expected, ours = _ddpm_and_ancestral(variance_type, clip_sample=False)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)


def test_clipped_ddim_equals_diffusers_ddim_clip_sample():
    """DDIMScheduler(clip_sample=True) clips x̂₀ to [−1, 1]; with use_clipped_model_output=True it also
    re-derives ε̂ from the clipped x̂₀ (GLIDE's convention), which is what sdeflow's clipping does for
    every method: the λ-family's drift, the score and every ε̂ a method reads must agree with the x̂₀ it
    forms, or the "direction pointing to x_t" of DDIM's update would still carry the unclipped x̂₀."""
    diffusers = pytest.importorskip("diffusers")
    unet = _unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True,
                                        timestep_spacing="trailing")
    expected, _ = _diffusers_loop(unet, scheduler, _x_T(), 10, use_clipped_model_output=True)
    model = adapt_diffusers(unet, scheduler)
    settings = dict(n_steps=10, grid="uniform", t_min=0.0, lmbd=1.0)
    ours = _sample(model, _x_T(), "ddim", clip=(-1.0, 1.0), **settings)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)
    assert float((ours - _sample(model, _x_T(), "ddim", **settings)).abs().max()) > 0.1  # the clipping binds


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_thresholded_ancestral_equals_diffusers_ddpm_thresholding(variance_type):
    """DDPMScheduler(thresholding=True) at dynamic_thresholding_ratio = p/100 and sdeflow's thresholding
    at percentile p of the same x̂₀, the posterior mean formed from it; diffusers also caps s at
    sample_max_value (1 by default, which makes thresholding plain clipping), set out of reach here."""
    expected, ours = _ddpm_and_ancestral(variance_type, wrap=lambda model: ClippedModel(model, (-1.0, 1.0), 99.5),
                                         thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e6)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)
    clipped, _ = _ddpm_and_ancestral(variance_type, clip_sample=True)
    assert float((expected - clipped).abs().max()) > 0.1  # thresholding is not clipping here


def _class_unet(num_class_embeds):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds)
    with torch.no_grad():  # a class table that matters as much as a trained one's
        unet.class_embedding.weight.mul_(4.0)
    return unet.double().eval()


def _class_ddim_loop(unet, scheduler, x, n_steps, labels, guidance=0.0, null=None):
    """diffusers' DDIM steps on unet(x, t, class_labels=labels), with classifier-free guidance toward the
    null label ``null`` at scale ``guidance``: the loop of diffusers' class-conditional examples."""
    scheduler.set_timesteps(n_steps)
    with torch.no_grad():
        for step in scheduler.timesteps:
            eps = unet(x, step, class_labels=labels).sample
            if guidance:
                eps = (1 + guidance) * eps - guidance * unet(x, step, class_labels=torch.full_like(labels, null)).sample
            x = scheduler.step(eps, step, x).prev_sample
    return x


def test_class_conditional_ddim_equals_diffusers_class_conditional_loop():
    """A UNet2DModel with num_class_embeds, adapted: class-conditional, called with class_labels; at w = 0
    sdeflow's DDIM equals diffusers' DDIM loop on the same noise and labels; with null_class=True its last
    embedding is the null class, and guided sampling equals the guided loop; without it, guidance and
    the unconditional model are refused."""
    diffusers = pytest.importorskip("diffusers")
    unet = _class_unet(4)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing="trailing")
    labels = torch.tensor([2, 0])
    settings = dict(n_steps=10, grid="uniform", t_min=0.0, lmbd=1.0)
    model = adapt_diffusers(unet, scheduler)
    assert model.net.num_classes == 4 and not model.net.has_null_class
    expected = _class_ddim_loop(unet, scheduler, _x_T(), 10, labels)
    ours = _sample(sdeflow.guided(model, labels), _x_T(), "ddim", **settings)
    _assert_close(ours, expected, FLOAT32_AGREEMENT)
    other = _class_ddim_loop(unet, scheduler, _x_T(), 10, torch.tensor([1, 3]))
    assert float((other - expected).abs().max()) > 100 * FLOAT32_AGREEMENT * float(expected.abs().max())
    for bad in (lambda: sdeflow.guided(model, 1, 2.0), lambda: sdeflow.guided(model, None)):
        with pytest.raises(ValueError, match="no null class"):
            bad()
    with pytest.raises(ValueError, match="no null class"):
        model.net(_x_T(), torch.full((2,), 0.5, dtype=torch.float64))

    model = adapt_diffusers(unet, scheduler, null_class=True)
    assert model.net.num_classes == 3 and model.net.has_null_class
    expected = _class_ddim_loop(unet, scheduler, _x_T(), 10, labels, guidance=1.5, null=3)
    _assert_close(_sample(sdeflow.guided(model, labels, 1.5), _x_T(), "ddim", **settings), expected,
                  FLOAT32_AGREEMENT)
    with pytest.raises(ValueError, match="labels must lie in"):
        sdeflow.guided(model, 4)


def test_load_foreign_reads_a_class_conditional_unet_for_the_command_line(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from sdeflow import cli

    unet = _class_unet(5).float()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "unet")
    model, config = load_foreign(f"diffusers:{tmp_path / 'unet'}")
    assert config["net"]["num_classes"] == 5 and model.net.num_classes == 5
    base = ["sample", "--model", f"diffusers:{tmp_path / 'unet'}", "--n", "2", "--method", "ddim", "--n-steps", "2",
            "--no-progress", "--out", str(tmp_path / "grid.png")]
    assert cli.main(base + ["--class", "4"]) == 0 and "class 4, guidance 0" in capsys.readouterr().out
    for extra, message in ((["--class", "5"], "--class must lie in [0, 4]"),
                           (["--class", "1", "--guidance", "2"], "no null class")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_load_foreign_reads_a_learned_range_unet(tmp_path):
    """A folder whose scheduler has variance_type "learned_range" loads with its variance head (it raised
    AttributeError reading the prediction type through the head)."""
    diffusers = pytest.importorskip("diffusers")
    _unet(6).float().save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range").save_pretrained(tmp_path / "unet")
    model, config = load_foreign(f"diffusers:{tmp_path / 'unet'}")
    assert sdeflow.nets.has_variance_head(model) and config["prediction_type"] == "epsilon"
    assert config["bound_start"] == pytest.approx(1 / 1000) and config["net"]["num_classes"] == 0


def test_load_foreign_reads_a_saved_pipeline(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = _unet().float()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.04, variance_type="fixed_small")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "unet-only")
    scheduler.save_pretrained(tmp_path / "unet-only")
    y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    for folder in ("pipe", "unet-only"):
        model, config = load_foreign(f"diffusers:{tmp_path / folder}")
        assert config["net"]["in_channels"] == 3 and config["net"]["image_size"] == 8
        assert config["data"]["transform"] == "centered" and config["bound_start"] == pytest.approx(1 / 200)
        assert sdeflow.make_sde(**config["sde"]) == model.sde and model.sde.num_train_timesteps == 200
        with torch.no_grad():
            direct = unet(y, model.sde.timestep(t).float()).sample
            assert torch.allclose(model.predicted_noise(y, t), direct, atol=1e-6)


# ---- k-diffusion -------------------------------------------------------------------------------------
def _kdiffusion_sampling():
    """k_diffusion.sampling; its package __init__ imports its training dependencies, so without them
    (``pip install --no-deps k-diffusion``) the file is loaded on its own with the one helper it uses."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pytest.importorskip("torchsde")
    try:
        import k_diffusion.sampling as sampling
        return sampling
    except ImportError:
        pass
    package = types.ModuleType("_kdiffusion_alone")
    package.__path__ = []
    utils = types.ModuleType("_kdiffusion_alone.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"_kdiffusion_alone": package, "_kdiffusion_alone.utils": utils})
    location = spec.submodule_search_locations[0] + "/sampling.py"
    file_spec = importlib.util.spec_from_file_location("_kdiffusion_alone.sampling", location)
    sampling = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(sampling)
    return sampling


class SmallDenoiser(torch.nn.Module):
    """EDM's preconditioning around a small random conv net: D = c_skip x + c_out F(c_in x, log σ / 4)."""

    def __init__(self, sigma_data=0.5):
        super().__init__()
        torch.manual_seed(1)
        self.sigma_data = sigma_data
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (s ** 2 + self.sigma_data ** 2)
        c_out = s * self.sigma_data / (s ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (s ** 2 + self.sigma_data ** 2).sqrt()
        h = torch.tanh(self.conv1(c_in * x) + torch.log(s) / 4)
        return c_skip * x + c_out * self.conv2(h)


SIGMA_MIN, SIGMA_MAX = 0.02, 20.0


def test_ode_likelihood_equals_kdiffusion_log_likelihood():
    sampling = _kdiffusion_sampling()
    denoiser = SmallDenoiser().double()
    x = 0.5 * _x_T((3, 3, 8, 8))
    torch.manual_seed(11)
    expected, _ = sampling.log_likelihood(denoiser, x, SIGMA_MIN, SIGMA_MAX, atol=1e-8, rtol=1e-8)
    model = adapt_denoiser(denoiser, SIGMA_MIN, SIGMA_MAX)
    ours = _log_prob_ode(model, x, rtol=1e-8, atol=1e-8, t_min=bound_start(model),
                         generator=torch.Generator().manual_seed(11))
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-4), (ours - expected)


def test_heun_equals_kdiffusion_sample_heun():
    sampling = _kdiffusion_sampling()
    denoiser = SmallDenoiser().double()
    model = adapt_denoiser(denoiser, SIGMA_MIN, SIGMA_MAX)
    t_min, n_steps = bound_start(model), 12
    times = sdeflow.time_grid(model.sde, n_steps, "karras", t_min, dtype=torch.float64)
    sigmas = model.sde.std(times)
    assert torch.allclose(sigmas, sampling.get_sigmas_karras(n_steps + 1, SIGMA_MIN, SIGMA_MAX).double()[:-1],
                          rtol=1e-5)
    x_T = SIGMA_MAX * _x_T()
    with torch.no_grad():
        expected = sampling.sample_heun(denoiser, x_T, sigmas, disable=True)
        expected_to_zero = sampling.sample_heun(denoiser, x_T, torch.cat([sigmas, sigmas.new_zeros(1)]), disable=True)
    ours = _sample(model, x_T, "heun", n_steps=n_steps, grid="karras", t_min=t_min, lmbd=1.0)
    _assert_close(ours, expected, 1e-12)
    with torch.no_grad():
        ours_to_zero = _sample_on_times(model, x_T, "heun", torch.cat([times, times.new_zeros(1)]))
    _assert_close(ours_to_zero, expected_to_zero, 1e-12)
    assert math.isfinite(float(ours_to_zero.abs().max()))
