"""Time grids (``sdeflow.samplers.grids``): each runs from t_start to t_min, strictly decreasing, with the
spacing that defines it."""

import pytest
import torch

from sdeflow.samplers.grids import SCHEDULES, time_grid
from oracle_helpers import SDES


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_time_grids_run_from_t_start_to_t_min(name, schedule):
    sde = SDES[name]()
    ts = time_grid(sde, 10, schedule, t_min=1e-3, dtype=torch.float64)
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
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(n_steps=0), "n_steps must be a positive integer"),
    (dict(t_min=-0.1), r"t_min must lie in \[0, t_start=1.0\); got -0.1"),
    (dict(t_min=0.5, t_start=0.5), r"t_min must lie in \[0, t_start=0.5\)"),
    (dict(t_min=float("nan")), r"t_min must lie in \[0, t_start=1.0\); got nan"),
    (dict(t_start=1.5), r"t_start must lie in \(0, T=1.0\]"),
    (dict(t_start=0.0), r"t_start must lie in \(0, T=1.0\]"),
    (dict(schedule="logsnr", t_min=0.0), r"schedule 'logsnr' needs t_min in \(0, t_start=1.0\)"),
    (dict(rho=0.0), "rho must be a positive finite number"),
])
def test_time_grid_refuses_what_it_cannot_space(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_grid(SDES["vp"](), **{"n_steps": 4, **kwargs})
