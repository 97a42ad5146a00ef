"""The run's movement watch without a model: --dt auto shrinks dt on too many undos, a fixed dt
stops in the burn-in, and `rtllm evaluate`'s reading of the log counts what the run counted."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rtllm.evaluation.movement_check import chain_movement
from rtllm.run.movement_watch import ChainNotMoving, MovementWatch
from rtllm.samplers import movement


def watch(dt="auto", burn_in=60, sampler="ray"):
    state, records, said = {"dt": 1e-3}, [], []
    cfg = SimpleNamespace(dt=dt, burn_in=burn_in, sampler=sampler, reject_threshold="auto")
    return MovementWatch(state, cfg, say=said.append, log=records.append), state, records, said


def test_dt_auto_halves_dt_when_a_window_has_too_many_undos():
    w, state, records, said = watch()
    allowed = int(movement.DT_UNDO_BOUND * movement.DT_WINDOW)
    for t in range(allowed):  # up to the bound: no change
        assert not w.after_step(t, True)
    assert state["dt"] == 1e-3
    assert w.after_step(allowed, True)  # one more in the same window: halved
    assert state["dt"] == pytest.approx(1e-3 / movement.DT_SHRINK)
    shrink = [r for r in records if r["type"] == "dt_shrink"]
    assert len(shrink) == 1 and shrink[0]["dt_old"] == 1e-3 and said and "undone" in said[0]
    # Past the burn-in plus one window the dt stays whatever happens.
    late = 60 + movement.DT_WINDOW
    assert not any(w.after_step(t, True) for t in range(late, late + 5))


def test_dt_auto_gives_up_after_the_last_shrink():
    w, state, _, _ = watch()
    with pytest.raises(ChainNotMoving, match="shrank dt"):
        for t in range(60):
            w.after_step(t, True)
    assert state["dt"] == pytest.approx(1e-3 / movement.DT_SHRINK ** movement.DT_MAX_SHRINKS)


@pytest.mark.parametrize("sampler, stops", [("ray", True), ("mclmc", False)])
def test_a_fixed_dt_burn_in_full_of_rejections_stops(sampler, stops):
    w, _, _, _ = watch(dt=1e6, sampler=sampler)
    limit = int(movement.STUCK_REJECTED_FRACTION * movement.DT_WINDOW)
    for t in range(limit):
        w.after_step(t, True)
    if stops:
        with pytest.raises(ChainNotMoving, match="smaller --dt"):
            w.after_step(limit, True)
    else:  # MCLMC keeps flagged steps (no undo): its tuning burn-in is not stopped
        w.after_step(limit, True)


def test_the_log_reading_counts_what_the_run_counted():
    """One check: the evaluation rebuilds from the log the counts the run judged on."""
    w, state, records, _ = watch(burn_in=10)
    for t in range(10 + 2 * movement.DT_WINDOW):
        rejected = t in (12, 13, 30, 95)  # two in the first sampling window: one dt shrink
        w.after_step(t, rejected)
        rec = {"type": "step", "step": t, "phase": "sampling" if t >= 10 else "burn-in"}
        records.append({**rec, "rejected": "undone"} if rejected else rec)
    rebuilt = chain_movement(records, [])
    assert (rebuilt.sampling_steps, rebuilt.rejected_steps) == (w.s["steps"], w.s["rejected"])
    assert any(r["type"] == "dt_shrink" for r in records) and w.s["rejected"] == 2
