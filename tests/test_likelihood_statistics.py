"""Statistics of per-example estimates: the mean, its standard error, and whether it can be trusted."""

import math

import pytest
import torch

from sdeflow.likelihood.statistics import mean_se, tail_diagnostics


def test_mean_se_is_the_mean_and_sd_over_root_n():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_se(values)
    assert mean == pytest.approx(3.5)
    assert se == pytest.approx(float(values.std()) / 2)
    assert math.isnan(mean_se(torch.tensor([1.0]))[1])


def test_tail_diagnostics_against_hand_computed_values():
    # d = (-.2, -.2, -.2, -.2, .8): Σd² = .8, Σd⁴ = .416, so share = .64/.8 and kurtosis = 5·.416/.64.
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    found = tail_diagnostics(values)
    assert found["tail_share"] == pytest.approx(0.8) and found["kurtosis"] == pytest.approx(3.25)
    assert found["tail_count"] == 1 and found["heavy_tailed"] is False  # 5 values: too few to tell
    assert tail_diagnostics(-7.0 * values + 3.0)["tail_share"] == pytest.approx(0.8)  # nats or bits/dim alike
    for degenerate in (torch.ones(30), torch.ones(1)):
        found = tail_diagnostics(degenerate)
        assert math.isnan(found["tail_share"]) and math.isnan(found["kurtosis"]) and not found["heavy_tailed"]


def test_gaussian_values_are_not_heavy_tailed_and_a_few_huge_outliers_are():
    gen = torch.Generator().manual_seed(0)
    big = tail_diagnostics(torch.randn(200_000, generator=gen, dtype=torch.float64))
    z = 2.5758293035489  # the 99.5 % quantile: the top 1 % of d² is |z| above it, a share 2(zφ(z) + 1 − Φ(z))
    expected_share = 2 * (z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) + 0.5 * math.erfc(z / math.sqrt(2)))
    assert big["tail_count"] == 2000 and big["tail_share"] == pytest.approx(expected_share, abs=0.003)
    assert big["kurtosis"] == pytest.approx(3.0, abs=0.05) and not big["heavy_tailed"]
    for n in (20, 50, 200, 1000):
        for _ in range(20):
            assert not tail_diagnostics(torch.randn(n, generator=gen))["heavy_tailed"], n
    for n, outliers in ((20, 1), (1000, 5), (5000, 20)):
        values = torch.randn(n, generator=gen, dtype=torch.float64)
        values[:outliers] += 1e3
        found = tail_diagnostics(values)
        assert found["heavy_tailed"] and found["tail_share"] > 0.9 and found["kurtosis"] > n / (2 * outliers), n
    one_outlier = torch.randn(19, generator=gen)
    one_outlier[0] = 1e3
    assert not tail_diagnostics(one_outlier)["heavy_tailed"]  # below 20 values a Gaussian meets the share too
