"""x̂₀ kept in the data's range (sdeflow.samplers.clipping): the data prediction every method reads stays
in the range, for clipping and dynamic thresholding and the ranges of all three data transforms; an
exact-score oracle whose data lie well inside the range samples the same with and without it; the
thresholding is Imagen's formula; the settings refuse what they must. (The equality with diffusers'
clipping and thresholding schedulers is in tests/test_peers.py, the command line in
tests/test_cli_sampling.py.)"""

import pickle

import pytest
import torch
from torch import nn

import sdeflow
from sdeflow.samplers.conditional import denoise, inpaint, posterior_sample
from sdeflow.data.transforms import TRANSFORMS, data_range
from sdeflow.model import MIN_STD
from sdeflow.nets import MeanAndVariance
from sdeflow.nets.oracles import ExactScoreNet, GaussianMixture
from sdeflow.samplers import METHODS, ClippedModel, SamplerSettings, clip_prediction
from sdeflow.utils import append_dims, as_time

from oracle_helpers import _one_thread  # noqa: F401 (fixture)
from oracle_helpers import SDES, exact_model

RANGES = {transform: data_range({"transform": transform, "alpha": 0.05}) for transform in TRANSFORMS}
MODES = {"clip": None, "threshold": 90.0}  # the percentile of each mode (None: clipping)


def _data(low, high, spread, dim=4):
    """A Gaussian centred in [low, high] with standard deviation ``spread`` half-widths."""
    centre, half_width = 0.5 * (low + high), 0.5 * (high - low)
    return GaussianMixture.gaussian(torch.full((dim,), centre), torch.full((dim,), spread * half_width))


def _options(method):
    return {"variance": "learned"} if method == "ancestral" else {}


class _VarianceHead(nn.Module):
    """ε̂ of ``net`` beside a variance interpolation r = tanh(y): a network with improved DDPM's learned Σ."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, y, t):
        return torch.cat([self.net(y, t), torch.tanh(y)], dim=1)


def _model_with_variance_head(sde, data):
    net = MeanAndVariance(_VarianceHead(ExactScoreNet(sde, data, "noise")))
    return sdeflow.PluginReverseSDE(sde, net, "noise").double()


class RecordingClippedModel(ClippedModel):
    """A ClippedModel that keeps the x̂₀ implied by everything it hands a sampler: (y − σ ε̂)/α of
    ε̂ (predicted_noise, noise_from_output) and Tweedie's (y + σ² s)/α of the score (score, drift/g)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.x0 = []

    def _record(self, y, t, eps):
        t = as_time(t, y.shape[0], y)
        alpha, sigma = (append_dims(k, y.ndim) for k in (self.sde.mean_weight(t), self.sde.std(t)))
        assert bool((sigma >= MIN_STD).all())  # where (y + σ² s)/α is the score's x̂₀
        self.x0.append((y - sigma * eps) / alpha)

    def noise_from_output(self, out, y, t):
        eps = super().noise_from_output(out, y, t)
        self._record(y, t, eps)
        return eps

    def predicted_noise(self, y, t):
        eps = super().predicted_noise(y, t)
        self._record(y, t, eps)
        return eps

    def score(self, y, t):
        score = super().score(y, t)
        self._record(y, t, -append_dims(self.sde.std(as_time(t, y.shape[0], y)), y.ndim) * score)
        return score

    def drift(self, y, t):
        drift = super().drift(y, t)
        self._record(y, t, -append_dims(self.sde.std(as_time(t, y.shape[0], y)), y.ndim) * drift
                     / self.sde.g(y, as_time(t, y.shape[0], y)))
        return drift


def _assert_in_range(recorded, low, high):
    x0 = torch.cat([x.reshape(-1) for x in recorded])
    tolerance = 1e-9 * max(1.0, abs(low), abs(high))
    assert float(x0.min()) >= low - tolerance and float(x0.max()) <= high + tolerance, (float(x0.min()),
                                                                                       float(x0.max()))
    # The range binds: some x̂₀ sit on its ends (clipped, or |z| ≥ s thresholded to ±1).
    assert float(x0.min()) <= low + tolerance or float(x0.max()) >= high - tolerance


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("method", list(METHODS))
def test_x0_never_leaves_the_range(method, transform, mode):
    """Data twice as wide as the range, so that x̂₀ leaves it unless kept in; the network has a
    variance head, which "ancestral" reads (variance "learned") through noise_from_output."""
    low, high = RANGES[transform]
    sde = SDES["vp"]()
    model = RecordingClippedModel(_model_with_variance_head(sde, _data(low, high, 2.0)), (low, high), MODES[mode])
    x = sdeflow.sample(model, (8, 4), SamplerSettings(method=method, n_steps=4, options=_options(method)),
                       generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isfinite(x).all() and model.x0
    _assert_in_range(model.x0, low, high)


@pytest.mark.parametrize("parameterization", ["score", "noise", "drift", "velocity"])
def test_every_parameterization_reads_the_clipped_x0(parameterization):
    low, high = RANGES["centered"]
    sde = SDES["subvp"]()
    model = RecordingClippedModel(exact_model(sde, _data(low, high, 2.0), parameterization), (low, high))
    for method in ("euler", "pc", "ddim"):
        sdeflow.sample(model, (8, 4), SamplerSettings(method=method, n_steps=4),
                       generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_in_range(model.x0, low, high)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_data_inside_the_range_sample_the_same(sde_name):
    """Exact score of data 5% of a half-width wide around the range's centre: x̂₀ never reaches the
    ends, so neither clipping nor thresholding (s = 1) changes a sample, for any method or range."""
    sde = SDES[sde_name]()
    for transform, (low, high) in RANGES.items():
        model = exact_model(sde, _data(low, high, 0.05, dim=3))
        for method in METHODS:
            runs = []
            for clip, threshold in ((None, None), ((low, high), None), ((low, high), 99.5)):
                settings = SamplerSettings(method=method, n_steps=30, clip=clip, threshold=threshold)
                runs.append(sdeflow.sample(model, (16, 3), settings, generator=torch.Generator().manual_seed(2),
                                           dtype=torch.float64))
            assert torch.isfinite(runs[0]).all()
            for run in runs[1:]:
                assert float((run - runs[0]).abs().max()) < 1e-8, (transform, method)


@pytest.mark.parametrize("spread", [0.05, 2.0])
def test_conditional_samplers_take_the_range_unchanged(spread):
    """inpaint (both schemes), denoise and posterior_sample with the range in their settings: data well
    inside it (5% of a half-width) sample as without it; data twice as wide as it sample otherwise."""
    low, high = RANGES["logit"]
    sde, data = SDES["vp"](), _data(low, high, spread, dim=3)
    model = exact_model(sde, data)
    x = data.sample(4, generator=torch.Generator().manual_seed(0)).double()
    mask = torch.tensor([True, False, True])
    A = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    calls = {
        "replacement": lambda settings, gen: inpaint(model, x, mask, "replacement", settings, generator=gen),
        "guided": lambda settings, gen: inpaint(model, x, mask, "guided", settings, covariance="jacobian",
                                                generator=gen),
        "denoise": lambda settings, gen: denoise(model, x + 0.1, 0.1, settings, generator=gen),
        "posterior": lambda settings, gen: posterior_sample(model, x @ A.T, A, 0.1, settings, generator=gen),
    }
    for name, call in calls.items():
        plain, kept = (call(SamplerSettings(n_steps=8, clip=clip, threshold=threshold),
                            torch.Generator().manual_seed(5))
                       for clip, threshold in ((None, None), ((low, high), 99.0)))
        assert torch.isfinite(kept).all()
        change = float((kept - plain).abs().max())
        assert change < 1e-8 if spread < 1 else change > 1e-3, (name, change)


def test_threshold_is_imagens_formula():
    """s = max(1, p-th percentile of |x̂₀|) per example (torch.quantile's linear interpolation: at
    p = 75 of four values, a quarter of the way from the third smallest to the largest), clip to
    [−s, s], divide by s; for [0, 1] the same on z = 2x̂₀ − 1, mapped back."""
    x0 = torch.tensor([[[0.5, -2.0], [3.0, 1.0]], [[0.1, -0.2], [0.3, 0.4]]], dtype=torch.float64)[:, None]
    s = 2.0 + 0.25 * (3.0 - 2.0)  # |x̂₀| sorted: 0.5, 1, 2, 3; the second example's 0.325 gives s = 1
    expected = torch.stack([torch.tensor([[0.5, -2.0], [s, 1.0]], dtype=torch.float64) / s,
                            x0[1, 0]])[:, None]
    assert torch.allclose(clip_prediction(x0, (-1.0, 1.0), 75.0), expected, rtol=0, atol=1e-15)
    assert torch.allclose(clip_prediction(0.5 + 0.5 * x0, (0.0, 1.0), 75.0), 0.5 + 0.5 * expected, rtol=0,
                          atol=1e-15)
    assert torch.allclose(clip_prediction(x0, (-1.0, 1.0), 100.0)[0], x0[0] / 3.0, rtol=0, atol=1e-15)
    assert torch.equal(clip_prediction(x0, (-1.0, 1.0)), x0.clamp(-1, 1))  # clipping
    assert clip_prediction(x0.float(), (-1.0, 1.0), 75.0).dtype == torch.float32


def test_noise_is_rederived_from_the_clipped_x0_and_finite_at_sigma_zero():
    """ε̂' = (y − α x̂₀')/σ (GLIDE's convention); at t = 0 (σ = 0 for VP) x̂₀ = y/α whatever ε̂ is, and
    ε̂ is left as it is."""
    sde, data = SDES["vp"](), _data(-1.0, 1.0, 2.0, dim=3)
    base = exact_model(sde, data, "noise")
    model = ClippedModel(base, (-1.0, 1.0))
    y = 3.0 * torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    alpha, sigma = sde.mean_weight(t)[:, None], sde.std(t)[:, None]
    x0 = ((y - sigma * base.predicted_noise(y, t)) / alpha).clamp(-1, 1)
    assert torch.allclose(model.predicted_noise(y, t), (y - alpha * x0) / sigma, rtol=1e-12, atol=1e-12)
    assert torch.allclose(model.score(y, t), -(y - alpha * x0) / sigma ** 2, rtol=1e-12, atol=1e-12)
    zero = torch.zeros(5, dtype=torch.float64)
    assert float(sde.std(zero).max()) == 0.0
    assert torch.equal(model.predicted_noise(y, zero), base.predicted_noise(y, zero))
    for value in (model.score(y, zero), model.drift(y, zero), model.generative_drift(y, zero)):
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("changes,match", [
    ({"clip": (1.0, -1.0)}, "clip must be a data range"),
    ({"clip": (0.0, float("nan"))}, "clip must be a data range"),
    ({"clip": (0.0, 1.0, 2.0)}, "clip must be a data range"),
    ({"clip": "01"}, "clip must be a data range"),
    ({"clip": (-1, 1), "threshold": 0}, "threshold must be a percentile in \\(0, 100\\]"),
    ({"clip": (-1, 1), "threshold": 100.5}, "threshold must be a percentile in \\(0, 100\\]"),
    ({"clip": (-1, 1), "threshold": "99"}, "threshold must be a percentile"),
    ({"threshold": 99.0}, "threshold=99 needs clip"),
])
def test_settings_refuse_bad_ranges_and_percentiles(changes, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**changes).validate(1.0)


def test_settings_keep_the_range_and_travel():
    settings = SamplerSettings(method="ddim", clip=[-1, 1], threshold=99).validate(1.0)
    assert settings.clip == (-1.0, 1.0) and isinstance(settings.clip, tuple) and settings.threshold == 99.0
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert SamplerSettings().validate(1.0).clip is None


def test_data_range_is_the_image_of_the_unit_interval():
    from sdeflow.data.transforms import Preprocess

    for transform in TRANSFORMS:
        low, high = data_range({"transform": transform, "alpha": 0.1})
        ends = Preprocess(transform, alpha=0.1).forward(torch.tensor([[0.0, 1.0]], dtype=torch.float64))[0]
        assert (low, high) == pytest.approx((float(ends[0, 0]), float(ends[0, 1])), abs=1e-12)
    assert RANGES["centered"] == (-1.0, 1.0) and RANGES["identity"] == (0.0, 1.0)


def test_training_grids_use_the_range_and_say_so(tmp_path, monkeypatch):
    from sdeflow.experiments import images as images_app
    from training_helpers import tiny_config, tiny_images, tiny_model, tiny_train_config

    seen = {}

    def fake_sample_images(model, config, n_samples, settings=None, **kwargs):
        seen["settings"] = settings
        return torch.zeros(n_samples, 1, 8, 8, dtype=torch.uint8)

    def fake_grid(images, path, title=""):
        seen["title"] = title

    monkeypatch.setattr(images_app, "sample_images", fake_sample_images)
    monkeypatch.setattr("sdeflow.plotting.save_image_grid", fake_grid)
    config = tiny_config(transform="centered")
    images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "run",
                            tiny_train_config(steps=1, sample_every=1, sample_n_samples=2, sample_threshold=99.5),
                            config)
    assert seen["settings"].clip == (-1.0, 1.0) and seen["settings"].threshold == 99.5
    assert "x̂₀ thresholded at p99.5 in [-1, 1]" in seen["title"]
