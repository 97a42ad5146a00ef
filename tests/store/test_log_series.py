"""Series read back from a run log (rtllm/store/log_series.py)."""
import numpy as np

from rtllm.store.log_series import heldout_series, stationarity_inputs, undo_counts


def step(t, phase, heldout=None, rejected=None):
    rec = {"type": "step", "step": t, "loss": 3.0, "phase": phase}
    if heldout is not None:
        rec["heldout_loss"] = heldout
    if rejected:
        rec["rejected"] = rejected
    return rec


def test_sampling_phase_series_last_record_wins_and_undo_rate_counts():
    log = [step(0, "burn-in", 5.0), step(1, "burn-in"),
           step(2, "sampling", 4.0), step(3, "sampling", rejected="undone"),
           step(4, "sampling", 3.9), step(5, "sampling", rejected="flagged for masking"),
           {"type": "probe", "step": 0, "probs": [[0.1, 0.2]]},
           {"type": "probe", "step": 2, "probs": [[0.3, 0.4]]},
           {"type": "probe", "step": 4, "probs": [[0.5, 0.6]]},
           {"type": "checkpoint", "step": 4},
           step(4, "sampling", 3.8)]  # resumed: step 4 logged again
    steps, loss = heldout_series(log)
    assert steps.tolist() == [2, 4] and loss.tolist() == [4.0, 3.8]
    assert undo_counts(log) == (1, 4)  # only "undone" counts, of the sampling-phase steps
    inputs = stationarity_inputs([log, log])
    assert inputs["undone_steps"] == 2 and inputs["sampling_steps"] == 8
    np.testing.assert_array_equal(inputs["probes"][0], [[0.3, 0.4], [0.5, 0.6]])  # after burn-in
