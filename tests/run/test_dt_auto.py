"""The --dt auto search on synthetic trials: it lands on the largest stable grid value."""
import math

import pytest

from rtllm.run import dt_auto as tune
def fake_trial(largest_stable):
    calls = []

    def trial(dt):
        calls.append(dt)
        end = 1.0 if dt <= largest_stable else 5.0
        return tune.Trial(dt=dt, start_loss=1.0, end_loss=end, stable=tune.is_stable(1.0, end, 0.1))

    return trial, calls


@pytest.mark.parametrize("largest", [3e-7, 1e-5, 2.9e-4, 0.5])
def test_search_lands_within_2x_below_the_stability_edge(largest):
    trial, calls = fake_trial(largest)
    dt, history = tune.search_dt(trial, 1e-3)
    assert dt <= largest < 2 * dt  # the grid is 2x fine near the edge
    assert [t.dt for t in history] == calls
    assert history[-1].stable is False or len(history) == 13  # stopped at the first unstable doubling


def test_search_gives_up_with_a_clear_error():
    trial, _ = fake_trial(0.0)
    with pytest.raises(RuntimeError, match="no stable step"):
        tune.search_dt(trial, 1e-3, max_shrinks=3)


def test_stability_rule():
    assert tune.is_stable(2.0, 2.19, 0.1)
    assert not tune.is_stable(2.0, 2.21, 0.1)
    assert not tune.is_stable(2.0, math.nan, 0.1)
    assert not tune.is_stable(2.0, math.inf, 0.1)
    assert tune.initial_dt(10_000) == pytest.approx(3e-4)
