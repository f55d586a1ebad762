"""Samplers against closed forms: a diagonal Gaussian under a linear SDE has an exact score
(``ExactScoreNet``) and an exact probability-flow map, so each sampler's own error is measured
apart from any learning error."""

import math

import pytest
import torch

import sdeflow
from sdeflow.samplers import METHODS, SamplerSettings, Trace
from oracle_helpers import _one_thread  # noqa: F401 (fixture)
from oracle_helpers import SDES, assert_gaussian_moments, exact_flow, exact_model, gaussian, true_marginal_T

N_SAMPLES = 4000


def draw(model, shape, *, x_T=None, generator=None, project=None, callback=None, **settings):
    """``sdeflow.sample`` in float64 with ``SamplerSettings(**settings)``: the one call of the API here."""
    return sdeflow.sample(model, shape, SamplerSettings(**settings), x_T=x_T, project=project, generator=generator,
                          callback=callback, dtype=torch.float64)


# ---- distribution: mean and covariance of the samples ------------------------------------------
# (method, lmbd, n_steps, grid): enough steps that the bias is well below the MC error.
MOMENT_CASES = [
    ("euler", 0.0, 300, None), ("euler", 0.5, 300, None),
    ("heun", 0.0, 100, None), ("heun", 0.5, 100, None), ("heun", 1.0, 60, None),
    ("ddim", 0.0, 200, None), ("ddim", 0.5, 100, None), ("ddim", 1.0, 100, None),
    ("dpm2", 1.0, 40, None), ("dpm3", 1.0, 15, None), ("dpm++2m", 1.0, 50, None),
    ("pc", 0.0, 200, None),
]


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("method,lmbd,n_steps,grid", MOMENT_CASES, ids=lambda v: str(v))
def test_samples_have_the_data_mean_and_covariance(name, method, lmbd, n_steps, grid):
    sde, data = SDES[name](), gaussian(2)
    model = exact_model(sde, data)
    gen = torch.Generator().manual_seed(0)
    x_T = true_marginal_T(sde, data, N_SAMPLES, gen)
    t_min = 1e-3 if grid in ("logsnr", "karras") else None
    x = draw(model, x_T.shape, method=method, n_steps=n_steps, lmbd=lmbd, grid=grid, t_min=t_min,
             x_T=x_T, generator=gen)
    assert_gaussian_moments(x, data)


def test_langevin_corrector_keeps_the_law():
    """PC with an ODE predictor: the corrector must not disturb the data law at a moderate snr."""
    sde, data = SDES["vp"](), gaussian(2)
    gen = torch.Generator().manual_seed(3)
    x_T = true_marginal_T(sde, data, N_SAMPLES, gen)
    x = draw(exact_model(sde, data), x_T.shape, method="pc", n_steps=100, lmbd=1.0,
             options={"snr": 0.05, "n_corrector": 2}, x_T=x_T, generator=gen)
    assert_gaussian_moments(x, data)


# ---- convergence order of the deterministic methods ----------------------------------------------
# (method, coarse n_steps, order): the error of the probability-flow solve against the exact flow
# map must shrink by ≈ 2^order from n_steps to 2·n_steps.
ORDER_CASES = [("euler", 32, 1), ("ddim", 32, 1), ("heun", 16, 2), ("dpm2", 8, 2), ("dpm3", 8, 3),
               ("dpm++2m", 32, 2)]


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("method,n_steps,order", ORDER_CASES)
def test_error_shrinks_at_the_stated_order(name, method, n_steps, order):
    assert str(order) in METHODS[method].order
    sde, data = SDES[name](), gaussian(2)
    model = exact_model(sde, data)
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_min = 1e-3 * sde.T
    exact = exact_flow(sde, data, x_T, t_min)
    errors = []
    for n in (n_steps, 2 * n_steps):
        x = draw(model, x_T.shape, method=method, n_steps=n, lmbd=1.0, t_min=t_min, x_T=x_T)
        errors.append(float((x - exact).abs().max()))
    measured = math.log2(errors[0] / errors[1])
    assert abs(measured - order) < 0.5, f"{method}: errors {errors}, measured order {measured:.2f}"


def _ancestral_law(sde, data, variance, n_steps):
    """The exact mean and variance (D,) of the "ancestral" sampler's output: with the exact ε̂ of Gaussian
    data each step is x' = A x + b + σ z per dimension, A and b read off two noiseless steps."""
    from sdeflow.discrete import step_chain

    model, spec = exact_model(sde, data, "noise"), METHODS["ancestral"]
    state = spec.resolve_options("ancestral", {"variance": variance})
    times = sdeflow.time_grid(sde, n_steps, "uniform", t_min=0.0)
    mean = torch.zeros(data.dim, dtype=torch.float64)
    var = torch.full((data.dim,), float(sde.prior_var), dtype=torch.float64)
    for i in range(n_steps):
        t, t_next = times[i].expand(2), times[i + 1].expand(2)
        basis = torch.stack([torch.zeros(data.dim), torch.ones(data.dim)]).double()
        out, _ = spec.step(model, basis, t, t_next, 0.0, None, True, state)
        b, a = out[0], out[1] - out[0]
        chain = step_chain(sde, float(t_next[0]), float(t[0]))
        noise = 0.0 if i == n_steps - 1 else float((chain.posterior_var if variance == "posterior" else chain.step_var)[2])
        mean, var = a * mean + b, a ** 2 * var + noise
    return mean, var


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("variance", ["posterior", "step"])
def test_ancestral_sampling_converges_weakly_at_first_order(name, variance):
    """The law of DDPM's ancestral sampler, propagated exactly, approaches the data's: the error of its
    variance halves when the steps double (weak order 1, as METHODS["ancestral"].order says)."""
    assert "1" in METHODS["ancestral"].order
    sde, data = SDES[name](), gaussian(2)
    errors = []
    for n_steps in (64, 128):
        mean, var = _ancestral_law(sde, data, variance, n_steps)
        errors.append(float((var - data.stds[0] ** 2).abs().max() + (mean - data.means[0]).abs().max()))
    measured = math.log2(errors[0] / errors[1])
    assert abs(measured - 1) < 0.3, f"errors {errors}, measured order {measured:.2f}"


@pytest.mark.parametrize("method,tolerance", [("heun", 0.02), ("dpm++2m", 0.01), ("ddim", 0.3)])
def test_a_last_step_onto_t_zero_lands_on_the_flow(method, tolerance):
    """At t = 0 (σ̃ = 0, infinite log-SNR) Heun takes an Euler step and DPM-Solver++ returns x̂₀."""
    for name in SDES:
        sde, data = SDES[name](), gaussian(2)
        x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        x = draw(exact_model(sde, data), x_T.shape, method=method, n_steps=100, grid="quadratic", t_min=0.0,
                 x_T=x_T)
        assert torch.isfinite(x).all()
        assert (x - exact_flow(sde, data, x_T, 0.0)).abs().max() < tolerance, name


# ---- accounting and reproducibility ---------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("t_min", [None, 0.0])
def test_reported_nfe_counts_network_calls(method, t_min):
    if t_min == 0.0 and METHODS[method].needs_positive_t_min:
        pytest.skip("the method needs t_min > 0")
    sde, data = SDES["vp"](), gaussian(2)
    model = exact_model(sde, data)
    n_steps = 7
    grid = "uniform" if t_min == 0.0 else None
    trace = Trace()
    draw(model, (5, 2), method=method, n_steps=n_steps, t_min=t_min, grid=grid, callback=trace)
    assert trace.nfe == model.net.calls
    expected = n_steps * METHODS[method].nfe()  # at the method's default options (pc: 1 + n_corrector)
    if method == "heun" and t_min == 0.0:
        expected -= 1  # the Euler step onto σ̃ = 0
    assert trace.nfe == expected
    assert len(trace.times) == n_steps


@pytest.mark.parametrize("method,lmbd", [("euler", 0.0), ("heun", 0.3), ("ddim", 0.0), ("dpm3", 1.0),
                                         ("dpm++2m", 1.0), ("pc", 0.0)])
def test_a_seed_reproduces_the_batch(method, lmbd):
    model = exact_model(SDES["ve"](), gaussian(2))

    def run(seed):
        return draw(model, (6, 2), method=method, n_steps=5, lmbd=lmbd, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))
    ode = [sdeflow.sample_ode(model, (6, 2), generator=torch.Generator().manual_seed(11), rtol=1e-3, atol=1e-3)
           for _ in range(2)]
    assert torch.equal(ode[0], ode[1])


def test_predictor_runs_before_corrector():
    """Algorithm 1 of Song et al. (2021): at step i the predictor evaluates the network at t_i, then
    each corrector step at t_{i+1}; score_sde's code ran the corrector first (two calls at T)."""
    sde = SDES["vp"]()
    model = exact_model(sde, gaussian(2))
    call_times = []
    forward = model.net.forward
    model.net.forward = lambda y, t: (call_times.append(float(t[0])), forward(y, t))[1]
    n_steps, n_corrector = 4, 2
    trace = Trace()
    draw(model, (3, 2), method="pc", n_steps=n_steps, options={"n_corrector": n_corrector}, callback=trace)
    grid = [sde.T] + trace.times
    expected = []
    for i in range(n_steps):
        expected += [grid[i]] + [grid[i + 1]] * n_corrector
    assert call_times == pytest.approx(expected)


def test_callback_trajectory_and_projection():
    model = exact_model(SDES["vp"](), gaussian(2))
    seen, trace = [], Trace(keep_states=True)

    def callback(report):
        seen.append((report["i"], report["nfe"]))
        trace(report)

    x = draw(model, (4, 2), method="dpm++2m", n_steps=6, callback=callback, project=lambda x, t: x.clamp(-0.1, 0.1))
    assert seen == [(i, i + 1) for i in range(6)]  # one evaluation a step, counted as it goes
    assert torch.stack(trace.states).shape == (6, 4, 2)
    assert torch.equal(trace.states[-1], x) and x.abs().max() <= 0.1


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rk45"), "method must be one of 'euler'"),
    (dict(grid="cosine"), "grid must be one of 'uniform', 'quadratic', 'logsnr', 'karras'"),
    (dict(n_steps=0), "n_steps must be a positive integer"),
    (dict(n_steps=2.5), "n_steps must be a positive integer"),
    (dict(method="dpm2", lmbd=0.5), r"'dpm2' supports λ = 1 only"),
    (dict(method="dpm++2m", lmbd=0.0), r"supports λ = 1 only"),
    (dict(lmbd=1.5), r"'euler' supports any λ in \[0, 1\]; got lmbd=1.5"),
    (dict(method="dpm3", t_min=0.0), r"method 'dpm3' needs t_min in \(0, t_start=1.0\)"),
    (dict(method="dpm3", t_min=1.0), r"method 'dpm3' needs t_min in \(0, t_start=1.0\)"),
    (dict(grid="logsnr", t_min=0.0), r"needs t_min in \(0, t_start"),
    (dict(grid="karras", t_min=-0.1), r"needs t_min in \(0, t_start"),
    (dict(t_min=1.2), r"t_min must lie in \[0, t_start"),
    (dict(t_start=1.5), r"t_start must lie in \(0, T"),
    (dict(options={"n_corrector": 2}), r"method 'euler' does not accept the option\(s\) n_corrector; it accepts: "
                                       r"none \('n_corrector' is an option of 'pc'\)"),
    (dict(method="pc", options={"corrector_steps": 2}), "'pc' does not accept .* it accepts: n_corrector, snr"),
    (dict(method="pc", options={"n_corrector": -1}), "n_corrector must be an integer >= 0"),
    (dict(method="pc", options={"n_corrector": 1.5}), "n_corrector must be an integer >= 0"),
    (dict(method="pc", options={"snr": 0.0}), "snr must be a positive finite number"),
    (dict(options=[("snr", 0.1)]), "options must be a mapping"),
])
def test_bad_input_to_sample_says_what_is_allowed(kwargs, match):
    model = exact_model(SDES["vp"](), gaussian(2))
    t_start = kwargs.pop("t_start", None)
    with pytest.raises(ValueError, match=match):
        sdeflow.sample(model, (2, 2), SamplerSettings(**{"n_steps": 3, **kwargs}), t_start=t_start)


def test_settings_resolve_the_methods_defaults_and_stay_frozen():
    import dataclasses
    import pickle

    settings = SamplerSettings(method="pc", options={"snr": 0.1})
    resolved = settings.validate(T=2.0)
    spec = METHODS["pc"]
    assert resolved == SamplerSettings(method="pc", n_steps=1000, lmbd=spec.default_lmbd, grid=spec.default_grid,
                                       t_min=spec.default_t_min * 2.0, options={"n_corrector": 1, "snr": 0.1})
    assert resolved.validate(T=2.0) == resolved  # resolving twice changes nothing
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.n_steps = 3
    with pytest.raises(TypeError):
        settings.options["snr"] = 0.2
    assert pickle.loads(pickle.dumps(resolved)) == resolved
    with pytest.raises(ValueError, match="settings must be a sdeflow.samplers.SamplerSettings"):
        sdeflow.sample(exact_model(SDES["vp"](), gaussian(2)), (2, 2), {"n_steps": 3})


# ---- a method registered from outside the package -----------------------------------------------
def _exponential_euler_step(model, x, t, t_next, lmbd, generator, last, state):
    """The first-order exponential integrator of the λ-family written from the public API only
    (model.score, the SDE's closed forms): x̂₀ = (x + σ_s² s)/α_s, ε̂ = −σ_s s,
    x_t = α_t clip(x̂₀) + √(σ_t² − c²) ε̂ + c z with c² = (1 − λ) σ_t² (1 − e^{2(ℓ_s − ℓ_t)})
    (DDIM with η = √(1 − λ)); x̂₀ clipped to ±clip_x0, as image samplers do."""
    from sdeflow.utils import append_dims

    sde = model.sde

    def coefs(time):
        time = time.double()
        return (append_dims(sde.mean_weight(time), x.ndim), append_dims(sde.std(time), x.ndim),
                append_dims(0.5 * sde.log_snr(time), x.ndim))

    (alpha, sigma, ell), (alpha_next, sigma_next, ell_next) = coefs(t), coefs(t_next)
    score = model.score(x, t)
    eps = -sigma * score
    x0 = ((x + sigma ** 2 * score) / alpha).clamp(-state["clip_x0"], state["clip_x0"])
    noise_var = (1 - lmbd) * sigma_next ** 2 * -torch.expm1(2 * (ell - ell_next))
    noise_var = torch.where(sigma_next > 0, noise_var, torch.zeros_like(noise_var))
    x_next = alpha_next * x0 + (sigma_next ** 2 - noise_var).clamp_min(0).sqrt() * eps
    if not last and lmbd < 1:
        x_next = x_next + noise_var.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x_next.to(x.dtype), 1


def _positive_or_inf(name, value):
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive number or inf; got {value!r}")
    return float(value)


@pytest.fixture
def exponential_euler():
    from sdeflow.samplers import Method, Option, register_method

    name = "test-exp-euler"
    register_method(name, Method(
        _exponential_euler_step, order="1", nfe_per_step=1, lmbd="any λ in [0, 1]", default_lmbd=1.0,
        default_grid="quadratic", default_t_min=1e-3,
        options={"clip_x0": Option(math.inf, _positive_or_inf, "clip the data prediction to ±clip_x0")}))
    yield name
    del METHODS[name]


def test_a_method_registered_from_outside_runs_through_sample(exponential_euler):
    name = exponential_euler
    model = exact_model(SDES["vp"](), gaussian(2))
    x_T = SDES["vp"]().prior_sample((16, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    trace = Trace()
    x = draw(model, x_T.shape, method=name, n_steps=9, x_T=x_T, callback=trace)
    assert trace.nfe == 9 == 9 * METHODS[name].nfe()
    # The same first-order exponential integrator as the built-in DDIM (same defaults).
    ddim = draw(model, x_T.shape, method="ddim", n_steps=9, x_T=x_T)
    assert torch.allclose(x, ddim, atol=1e-10)
    clipped = draw(model, x_T.shape, method=name, n_steps=9, x_T=x_T, options={"clip_x0": 0.1})
    # At t_min = 10⁻³ the state is α·x̂₀ plus a σ_{t_min} ≈ 0.01 share of the noise prediction.
    assert clipped.abs().max() < 0.15 < x.abs().max()
    with pytest.raises(ValueError, match="clip_x0 must be a positive number"):
        draw(model, (2, 2), method=name, n_steps=3, options={"clip_x0": -1.0})
    with pytest.raises(ValueError, match=rf"'{name}' does not accept .*n_corrector.* it accepts: clip_x0"):
        draw(model, (2, 2), method=name, n_steps=3, options={"n_corrector": 1})


def test_a_method_registered_from_outside_runs_through_inpaint_and_denoise(exponential_euler):
    name = exponential_euler
    model = exact_model(SDES["vp"](), gaussian(4))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    trace = Trace()
    samples = sdeflow.inpaint(model, x, mask, "guided", SamplerSettings(method=name, n_steps=7, options={"clip_x0": 3.0}),
                              generator=torch.Generator().manual_seed(1), callback=trace)
    assert trace.nfe == 7 and trace.last["backward_passes"] == 7
    assert torch.isfinite(samples).all() and torch.equal(samples[:, mask], x[:, mask])
    # Denoising runs the reverse SDE (λ = 0): the same noise draws as DDIM's give the same samples.
    traces = [Trace(), Trace()]
    draws = [sdeflow.denoise(model, x, 0.5, SamplerSettings(method=m, n_steps=7),
                             generator=torch.Generator().manual_seed(2), callback=trace)
             for m, trace in zip((name, "ddim"), traces)]
    assert traces[0].nfe == 7 and model.net.calls == 3 * 7  # inpaint and two denoise runs
    assert torch.allclose(draws[0], draws[1], atol=1e-10)


def test_register_method_refuses_duplicates_and_inconsistent_entries(exponential_euler):
    from sdeflow.samplers import Method, Option, register_method

    with pytest.raises(ValueError, match="'euler' is already registered"):
        register_method("euler", METHODS["heun"])
    with pytest.raises(ValueError, match=f"'{exponential_euler}' is already registered"):
        register_method(exponential_euler, METHODS["heun"])
    with pytest.raises(ValueError, match="default_lmbd=0.0 lies outside lmbd_range"):
        register_method("bad-lmbd", Method(_exponential_euler_step, "1", 1, "λ = 1", lmbd_range=(1.0, 1.0)))
    with pytest.raises(ValueError, match="clip_x0 must be a positive number"):
        register_method("bad-default", Method(_exponential_euler_step, "1", 1, "any",
                                              options={"clip_x0": Option(0.0, _positive_or_inf)}))
    with pytest.raises(ValueError, match="step_nfe"):
        register_method("bad-nfe", Method(_exponential_euler_step, "1", "1 + k", "any"))
    assert not {"bad-lmbd", "bad-default", "bad-nfe"} & set(METHODS)
