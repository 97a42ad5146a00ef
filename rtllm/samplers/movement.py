"""Does the chain move? The run's guards in the posterior's own units, and the one check that
tells a chain from an ensemble of copies (docs/sampling.md, "Guards").

Pure functions of numbers, used by the sampling run (`rtllm.run.movement_watch`) while it runs
and by `rtllm evaluate` (`rtllm.evaluation.movement_check`) on the run's log and manifest, so
both judge a chain by the same rule.

Units. The target is exp(-S * loss) with S = D / (2 * tolerance): near a minimum the posterior's
loss sits `tolerance` nats above it, so a tolerance is the posterior's natural loss scale. A
step's minibatch loss also changes because the batch changes: two batches differ by
sqrt(2) * sigma, sigma the spread of minibatch losses at the start. Every guard is written in
these two units, never in absolute nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# The undo threshold: a step's loss may rise UNDO_TOLERANCES tolerances (a stationary chain's
# loss moves far less than one tolerance per step: its whole spread is ~tolerance * sqrt(2/D))
# plus UNDO_NOISE_SIGMAS standard deviations of the difference of two minibatch losses (a
# Gaussian 6-sigma event: ~1e-9 per step; real batch losses have heavier tails).
UNDO_TOLERANCES = 5.0
UNDO_NOISE_SIGMAS = 6.0
# --dt auto keeps the undo rate of the steps after it below this bound, judged on windows of
# DT_WINDOW steps (more than one undo in 50 steps shrinks dt by DT_SHRINK).
DT_UNDO_BOUND = 0.02
DT_WINDOW = 50
DT_SHRINK = 2.0
DT_MAX_SHRINKS = 6
# A chain is stuck when more than this fraction of its sampling steps were undone or flagged:
# each undo reverses the velocity, so beyond a few per cent the chain mostly bounces in place
# (docs/benchmarks.md, "Issue 19": the bias it causes on Gaussians).
STUCK_REJECTED_FRACTION = 0.10
MIN_STEPS_FOR_VERDICT = 20
# Kept samples are copies when their probed weights moved less than MOVE_FLOOR times one step's
# expected move per coordinate (dt * speed per coordinate) between consecutive samples, in the
# median over consecutive pairs. A moving chain moves at least one step between samples.
MOVE_FLOOR = 0.1
# Held-out losses that agree to this relative precision are one model evaluated twice.
SAME_HELDOUT_REL = 1e-7
# A sample whose minibatch loss is this many undo thresholds (at the default rule) above the
# start is absurd: it is masked.
ABSURD_THRESHOLDS = 4.0


def undo_threshold(tolerance: float, batch_loss_std: float) -> float:
    """The default --reject-threshold (nats): 5 tolerances + 6 sigma of a two-batch difference."""
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"the loss tolerance must be a finite number > 0, got {tolerance!r}")
    sigma = batch_loss_std if math.isfinite(batch_loss_std) and batch_loss_std > 0 else 0.0
    return UNDO_TOLERANCES * tolerance + UNDO_NOISE_SIGMAS * math.sqrt(2.0) * sigma


def is_jump(prev_loss: float | None, loss: float, threshold: float | None) -> bool:
    """The step that led to `loss` is rejected: the loss is not finite or rose by > threshold."""
    if prev_loss is None:
        return False
    if not math.isfinite(loss):
        return True
    return threshold is not None and loss - prev_loss > threshold


def is_absurd(loss: float, start_loss: float, tolerance: float, batch_loss_std: float) -> bool:
    """A sample's loss too far above the start to come from the posterior (it is masked)."""
    limit = ABSURD_THRESHOLDS * undo_threshold(tolerance, batch_loss_std)
    return not math.isfinite(loss) or loss - start_loss > limit


def in_tolerances(rise: float, tolerance: float) -> float:
    """A loss rise in units of the tolerance (the posterior's own loss scale)."""
    return rise / tolerance


def dt_window_exceeded(undone: int, window: int = DT_WINDOW, bound: float = DT_UNDO_BOUND) -> bool:
    """More undos in a window of `window` steps than the --dt auto bound allows."""
    return undone > bound * window


def rms_move(before: Sequence[float], after: Sequence[float]) -> float:
    """Root-mean-square change per probed coordinate between two samples."""
    if len(before) != len(after) or not before:
        raise ValueError(f"probed weights must be two non-empty lists of one length, got "
                         f"{len(before)} and {len(after)}")
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(before, after)) / len(before))


@dataclass(frozen=True)
class Movement:
    """What is known of one chain's sampling phase.

    sampling_steps / rejected_steps: steps since sampling began (or since --dt auto last shrank
    dt), and how many of them were undone or flagged. sample_moves: rms_move between consecutive
    kept samples. step_move: the expected move per coordinate of one step (dt * speed), or None.
    heldout_losses: the kept samples' held-out losses.
    """

    sampling_steps: int
    rejected_steps: int
    sample_moves: tuple[float, ...] = ()
    step_move: float | None = None
    heldout_losses: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.sampling_steps < 0 or not 0 <= self.rejected_steps <= max(self.sampling_steps, 0):
            raise ValueError(f"rejected steps ({self.rejected_steps}) must lie in 0..sampling steps "
                             f"({self.sampling_steps})")


@dataclass(frozen=True)
class Verdict:
    moving: bool
    reason: str  # one sentence: what is wrong ("" when moving)
    rejected_fraction: float | None  # None with fewer than MIN_STEPS_FOR_VERDICT steps
    median_move_in_steps: float | None  # median sample move / step_move


def judge(m: Movement, *, max_rejected_fraction: float = STUCK_REJECTED_FRACTION,
          min_steps: int = MIN_STEPS_FOR_VERDICT) -> Verdict:
    """The one check: does this chain move, or are its samples (near-)copies?"""
    fraction = m.rejected_steps / m.sampling_steps if m.sampling_steps >= min_steps else None
    median = None
    if m.sample_moves and m.step_move:
        moves = sorted(m.sample_moves)
        median = moves[len(moves) // 2] / m.step_move
    if fraction is not None and fraction > max_rejected_fraction:
        return Verdict(False, f"{m.rejected_steps} of {m.sampling_steps} sampling steps were undone "
                       f"or flagged ({fraction:.0%} > {max_rejected_fraction:.0%}), so the chain "
                       f"bounces in place", fraction, median)
    if median is not None and median < MOVE_FLOOR:
        return Verdict(False, f"the samples are copies: their weights moved {median:.2g} steps "
                       f"between samples (< {MOVE_FLOOR})", fraction, median)
    held = [h for h in m.heldout_losses if h is not None]
    if len(held) >= 3 and all(math.isfinite(h) for h in held):
        scale = max(1.0, max(abs(h) for h in held))
        if max(held) - min(held) <= SAME_HELDOUT_REL * scale:
            return Verdict(False, f"the samples are copies: all {len(held)} record the same held-out "
                           f"loss {held[0]:.6g}", fraction, median)
    return Verdict(True, "", fraction, median)
