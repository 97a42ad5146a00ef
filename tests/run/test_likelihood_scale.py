"""--scale: how S is set (rtllm/run/likelihood_scale.py)."""
import math

import pytest

from rtllm.run.config import SampleConfig
from rtllm.run.likelihood_scale import likelihood_scale, run_likelihood_scale


def cfg(**kw):
    return SampleConfig(model="m", train=("t",), out="o", **kw)


def test_the_three_scales_and_the_override():
    D, N, tol = 500_000, 60_000, 0.05
    assert likelihood_scale("tolerance", num_params=D, train_tokens=N, loss_tolerance=tol) == D / (2 * tol)
    assert likelihood_scale("tokens", num_params=D, train_tokens=N, loss_tolerance=tol) == N
    tempered = likelihood_scale("tempered", num_params=D, train_tokens=N, loss_tolerance=tol)
    assert tempered == pytest.approx(math.sqrt(N * D / (2 * tol))) and N < tempered < D / (2 * tol)
    assert run_likelihood_scale(cfg(), D, train_tokens=N) == D / (2 * 0.05)  # the default
    assert run_likelihood_scale(cfg(scale="tokens"), D, train_tokens=N) == N
    assert run_likelihood_scale(cfg(scale_likelihood=7.0), D, train_tokens=N) == 7.0
    assert run_likelihood_scale(cfg(scale="tempered", loss_tolerance=0.5), D, train_tokens=N) == \
        pytest.approx(math.sqrt(N * D))


@pytest.mark.parametrize("kw, match", [
    (dict(scale="hot"), "--scale must be tolerance, tokens or tempered"),
    (dict(scale="tokens", scale_likelihood=3.0), "--scale-likelihood sets S itself"),
    (dict(scale="tokens", loss_tolerance=0.1), "--scale tokens sets S"),
])
def test_conflicting_options_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_bad_counts():
    with pytest.raises(ValueError, match="--scale must be one of"):
        likelihood_scale("x", num_params=1, train_tokens=1, loss_tolerance=1.0)
    with pytest.raises(ValueError, match="needs D >= 1"):
        likelihood_scale("tokens", num_params=1, train_tokens=0, loss_tolerance=1.0)
