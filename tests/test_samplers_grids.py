"""Time grids (``sdeflow.samplers.grids``): each runs from t_start to t_min, strictly decreasing, with the
spacing that defines it."""

import pytest
import torch

from sdeflow import SamplerSettings, register_grid, sample
from sdeflow.samplers.grids import GRIDS, time_grid
from oracle_helpers import SDES, exact_model, gaussian


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("grid", GRIDS)
def test_time_grids_run_from_t_start_to_t_min(name, grid):
    sde = SDES[name]()
    ts = time_grid(sde, 10, grid, t_min=1e-3, dtype=torch.float64)
    assert ts.shape == (11,)
    assert ts[0] == sde.T and ts[-1] == 1e-3
    assert (ts[1:] < ts[:-1]).all()


def test_time_grids_have_their_defining_spacing():
    sde = SDES["vp"]()
    ts = time_grid(sde, 8, "logsnr", t_min=1e-3, dtype=torch.float64)
    assert torch.allclose(torch.diff(sde.log_snr(ts)), torch.diff(sde.log_snr(ts))[0].expand(8))
    ts = time_grid(sde, 8, "karras", t_min=1e-3, dtype=torch.float64)
    root = torch.exp(-0.5 * sde.log_snr(ts)) ** (1 / 7)
    assert torch.allclose(torch.diff(root), torch.diff(root)[0].expand(8))
    ts = time_grid(sde, 8, "quadratic", t_min=0.0, dtype=torch.float64)
    assert torch.allclose(ts.sqrt(), torch.linspace(1, 0, 9, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid="cosine"), "grid must be one of"),
    (dict(n_steps=0), "n_steps must be a positive integer"),
    (dict(t_min=-0.1), r"t_min must lie in \[0, t_start=1.0\); got -0.1"),
    (dict(t_min=0.5, t_start=0.5), r"t_min must lie in \[0, t_start=0.5\)"),
    (dict(t_min=float("nan")), r"t_min must lie in \[0, t_start=1.0\); got nan"),
    (dict(t_start=1.5), r"t_start must lie in \(0, T=1.0\]"),
    (dict(t_start=0.0), r"t_start must lie in \(0, T=1.0\]"),
    (dict(grid="logsnr", t_min=0.0), r"grid 'logsnr' needs t_min in \(0, t_start=1.0\)"),
])
def test_time_grid_refuses_what_it_cannot_space(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_grid(SDES["vp"](), **{"n_steps": 4, **kwargs})


@pytest.fixture
def grid_named():
    """Registers grids for one test and removes them after."""
    from sdeflow.samplers.grids import GRIDS

    added = []

    def register(name, place, **kwargs):
        added.append(name)
        return register_grid(name, place, **kwargs)
    yield register
    for name in added:
        GRIDS.pop(name, None)


def test_a_registered_grid_reaches_every_sampler(grid_named):
    """A grid of one's own (here: the square root of the uniform grid's fractions) is taken by time_grid,
    SamplerSettings and sample, which runs on exactly its times."""
    grid_named("sqrt", lambda sde, n, t_start, t_min: t_min + (t_start - t_min) * torch.linspace(1, 0, n + 1,
                                                                                              dtype=torch.float64).sqrt())
    sde = SDES["vp"]()
    ts = time_grid(sde, 4, "sqrt", t_min=0.0, dtype=torch.float64)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64).sqrt())
    model = exact_model(sde, gaussian(2))
    seen = []
    sample(model, (3, 2), SamplerSettings(method="euler", n_steps=4, grid="sqrt", t_min=0.0),
           generator=torch.Generator().manual_seed(0), callback=lambda report: seen.append(float(report["t"])),
           dtype=torch.float64)
    assert seen == ts[1:].tolist()


def test_register_grid_refuses_a_taken_name_or_no_function(grid_named):
    with pytest.raises(ValueError, match="a grid named 'uniform' is already registered"):
        register_grid("uniform", lambda *a: None)
    with pytest.raises(ValueError, match="place must be callable"):
        grid_named("broken", "not a function")
    grid_named("short", lambda sde, n, t_start, t_min: torch.linspace(t_start, t_min, n))
    with pytest.raises(ValueError, match="grid 'short' placed \\(4,\\) times; a grid of n_steps=4 has 5"):
        time_grid(SDES["vp"](), 4, "short")


def test_sample_on_explicit_times_equals_the_grid_of_the_same_times():
    sde = SDES["vp"]()
    model = exact_model(sde, gaussian(2))
    settings = SamplerSettings(method="ddim", n_steps=6, grid="quadratic", t_min=0.0)
    on_grid = sample(model, (4, 2), settings, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = time_grid(sde, 6, "quadratic", t_min=0.0, dtype=torch.float64)
    on_times = sample(model, (4, 2), SamplerSettings(method="ddim"), times=times,
                      generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(on_grid, on_times)


@pytest.mark.parametrize("times,kwargs,match", [
    ([1.0, 0.5, 0.5, 0.0], {}, "times must be strictly decreasing"),
    ([1.5, 0.5, 0.0], {}, r"times must lie in \[0, T=1.0\]"),
    ([1.0], {}, "times must be a 1-D float tensor of at least 2 times"),
    ([1.0, 0.0], {"t_start": 0.5}, "give t_start or times, not both"),
])
def test_sample_refuses_times_it_cannot_run(times, kwargs, match):
    model = exact_model(SDES["vp"](), gaussian(2))
    with pytest.raises(ValueError, match=match):
        sample(model, (2, 2), SamplerSettings(method="ddim"), times=torch.tensor(times, dtype=torch.float64), **kwargs)
