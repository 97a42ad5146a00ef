"""rtllm.samplers.movement: the guards' units and the one check that a chain moves (issue 19)."""
import math

import pytest

from rtllm.samplers import movement as mv


def test_undo_threshold_is_in_tolerances_plus_minibatch_noise():
    assert mv.undo_threshold(0.05, 0.0) == pytest.approx(mv.UNDO_TOLERANCES * 0.05)
    assert mv.undo_threshold(2.0, 0.0) == pytest.approx(40 * mv.undo_threshold(0.05, 0.0))
    noise = mv.undo_threshold(0.05, 0.2) - mv.undo_threshold(0.05, 0.0)
    assert noise == pytest.approx(mv.UNDO_NOISE_SIGMAS * math.sqrt(2) * 0.2)
    assert mv.undo_threshold(0.05, math.nan) == mv.undo_threshold(0.05, 0.0)
    with pytest.raises(ValueError, match="tolerance"):
        mv.undo_threshold(0.0, 0.1)


def test_is_jump():
    assert not mv.is_jump(None, 1e9, 0.1)  # nothing to compare with yet
    assert mv.is_jump(1.0, 1.2, 0.1) and not mv.is_jump(1.0, 1.05, 0.1)
    assert not mv.is_jump(1.0, 0.0, 0.1)  # only rises count
    assert mv.is_jump(1.0, math.inf, None) and mv.is_jump(1.0, math.nan, 10.0)
    assert not mv.is_jump(1.0, 1e9, None)  # no threshold: only non-finite losses jump


def test_absurd_sample_losses():
    assert mv.is_absurd(math.inf, 5.0, 0.05, 0.1)
    assert mv.is_absurd(8.7e14, 5.0, 0.05, 0.1)
    assert not mv.is_absurd(5.5, 5.0, 0.05, 0.1)  # 0.5 nats: within 4 thresholds of ~1.1 nats
    assert not mv.is_absurd(25.0, 5.0, 2.0, 0.1)  # hot posterior: 20 nats is 10 tolerances


def test_the_issue_chain_is_stuck_and_a_healthy_one_is_not():
    # The issue's run: 90 of the 180 sampling steps undone, ten samples of one held-out loss.
    stuck = mv.judge(mv.Movement(180, 90, heldout_losses=(4.1234567,) * 10))
    assert not stuck.moving and "90 of 180" in stuck.reason and stuck.rejected_fraction == 0.5
    healthy = mv.judge(mv.Movement(180, 2, sample_moves=(3.0, 5.0, 4.0), step_move=1e-3,
                                   heldout_losses=(4.10, 4.12, 4.11)))
    assert healthy.moving and healthy.reason == "" and healthy.median_move_in_steps > 1000


def test_copies_are_caught_by_the_weights_or_the_heldout_losses():
    copies = mv.judge(mv.Movement(100, 0, sample_moves=(0.0, 0.0, 1e-3), step_move=1.0))
    assert not copies.moving and "copies" in copies.reason
    # Without weight records (older logs): held-out losses equal to float precision.
    same = mv.judge(mv.Movement(100, 0, heldout_losses=(5.25, 5.25, 5.25)))
    assert not same.moving and "held-out" in same.reason
    differ = mv.judge(mv.Movement(100, 0, heldout_losses=(5.25, 5.2501, 5.25)))
    assert differ.moving


def test_short_runs_are_not_judged_on_their_rejected_fraction():
    v = mv.judge(mv.Movement(mv.MIN_STEPS_FOR_VERDICT - 1, 5))
    assert v.moving and v.rejected_fraction is None
    with pytest.raises(ValueError, match="rejected steps"):
        mv.Movement(10, 11)


def test_dt_window_bound_and_rms_move():
    window = mv.DT_WINDOW
    assert not mv.dt_window_exceeded(int(mv.DT_UNDO_BOUND * window))
    assert mv.dt_window_exceeded(int(mv.DT_UNDO_BOUND * window) + 1)
    assert mv.rms_move([0.0, 0.0], [3.0, 4.0]) == pytest.approx(math.sqrt(12.5))
    with pytest.raises(ValueError, match="probed weights"):
        mv.rms_move([1.0], [1.0, 2.0])
