"""The run's undo on the Gaussian battery (scripts/undo_gaussian.py has the setting): with the
guards at their defaults it never fires, cold or hot, and E|y|^2/D stays unbiased; a fixed
1-nat threshold on a hot posterior fires and biases it low (the undo is no Metropolis test).

Thresholds: z = bias / SE with SE from 20 batch means after a 2,000-step burn-in; |z| < 4 for
"unbiased" (a false alarm once in ~16,000 runs for a correct sampler; the batch-means SE itself
is uncertain by ~16% at 20 batches, which 4 sigma absorbs) and z < -4 for "biased low".
"""
from __future__ import annotations

import sys

import pytest

from repo_paths import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import undo_gaussian as G  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tolerance", [0.05, 8.0])
def test_default_guards_never_fire_and_stay_unbiased(tolerance):
    values, undone = G.undo_chain(tolerance, "auto", steps=6_000, seed=3)
    assert undone == 0.0
    bias, se = G.bias_and_se(values)
    assert abs(bias / se) < 4, (bias, se)


@pytest.mark.slow
def test_a_fixed_one_nat_threshold_biases_a_hot_posterior():
    """The issue-19 mechanism on a Gaussian: at T = 8 the minibatch loss moves ~0.5 nats a step
    (T times the gradient noise's share of the loss), so a fixed 1-nat undo fires often, and
    each undo reverses the ray towards lower loss."""
    values, undone = G.undo_chain(8.0, 1.0, steps=20_000, seed=3)
    assert undone > 0.02
    bias, se = G.bias_and_se(values)
    assert bias / se < -4, (bias, se)
