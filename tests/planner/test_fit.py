"""The profile fits: least squares held non-negative, as the simulator needs positive step times."""

import numpy as np

from planner.fit import fit_decode, fit_nonnegative, fit_prefill, nonnegative_fit


def test_negative_coefficients_are_refit_at_zero():
    # decode times falling with batch (noise on a busy host): least squares would give c < 0
    pre = [([16], 5.0), ([64], 9.0), ([256], 30.0), ([16] * 4, 10.0)]
    dec = [([16], 4.0), ([16] * 2, 3.0), ([16] * 4, 2.0), ([64], 5.0)]
    assert min(fit_decode(dec)["decode_small"].coeffs) < 0
    p, d, refit = fit_nonnegative(pre, dec, 95)
    assert refit == ["decode_small"] and d["decode_large"] is d["decode_small"]
    assert min(d["decode_small"].coeffs) >= 0 and p.coeffs == fit_prefill(pre).coeffs
    # exact data stays exact
    x = np.array([[1, 1, 1], [1, 2, 4], [1, 3, 9], [1, 5, 2]], float)
    f = nonnegative_fit(x, x @ np.array([1.0, 3.0, 2.0]))
    assert np.allclose(f.coeffs, (1, 3, 2)) and f.rmse_ms < 1e-9
