"""Pins, at fixed seeds in float64, the small-form figures of the README's estimators and samplers,
computed before the core was reshaped (issue 19): moving code must not move a number."""

import math

import pytest

from pin_regression import figures

PINNED = {
    'dsm_noise': 62.10780824556524,
    'dsm_likelihood_importance_noise': 981.6769798775966,
    'dsm_drift': 7.761665683536381,
    'dsm_likelihood_importance_drift': 172.71455329776524,
    'dsm_score': 38.806255435257384,
    'dsm_likelihood_importance_score': 542.8799924861328,
    'dsm_velocity': 10.407178754900386,
    'dsm_likelihood_importance_velocity': 314.46952659354,
    'elbo_uniform': -775.1967233039517,
    'elbo_importance': -592.1473002261721,
    'fitted_probs': 20.915425730357804,
    'fitted_control': 27.555290438248864,
    'elbo_fitted': -517.7365543198306,
    'ode_logp': -101.32498213220019,
    'sample_euler': 3910163.4720469983,
    'sample_ddim': 1145604.8913772067,
    'sample_dpm++2m': 1716792.1309194118,
    'sample_heun': 1997946.3260575086,
    'sample_ode': 1943458.1709540458,
}


@pytest.fixture(scope="module")
def measured():
    return figures()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_figure_is_unchanged(measured, name):
    assert math.isclose(measured[name], PINNED[name], rel_tol=1e-12, abs_tol=0.0), (name, measured[name])


def test_every_figure_is_pinned(measured):
    assert set(measured) == set(PINNED)
