"""Confidence intervals over seeds."""

import math

import pytest
import torch

from pml_crt.utils.stats import format_mean_ci, mean_ci95, t_quantile_975


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_quantile_has_cdf_0975(df):
    """Integrate the Student-t density numerically up to the tabled quantile."""
    q = t_quantile_975(df)
    grid = torch.linspace(-q, q, 400001, dtype=torch.float64)
    density = torch.distributions.StudentT(df).log_prob(grid).exp()
    inner = torch.trapezoid(density, grid).item()
    assert 1 - (1 - inner) / 2 == pytest.approx(0.975, abs=2e-4)


def test_mean_ci95_by_hand():
    values = [0.5, 0.6, 0.7]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert format_mean_ci(values) == "60.00 ± 24.84"


def test_single_value_has_no_spread():
    mean, half = mean_ci95([0.25])
    assert mean == 0.25 and math.isnan(half)
    assert format_mean_ci([0.25]) == "25.00"
    with pytest.raises(ValueError, match="values must not be empty"):
        mean_ci95([])
