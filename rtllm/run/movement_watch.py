"""The sampling run's watch on its own movement: the undo rate and the samples' spread.

Called by `SamplingRun` after every step and every sample; the decisions themselves are the
pure functions of `rtllm.samplers.movement` (the same ones `rtllm evaluate` applies to the
log). Its counters live in the run's state dict (`state["movement"]`), so they are saved in
checkpoints and a resumed run decides exactly as an uninterrupted one.

- `--dt auto`: in windows of DT_WINDOW steps from the start up to DT_WINDOW steps into the
  sampling phase, more undos than the bound allows halves dt (logged, `dt_shrink` record).
- Fixed dt: a burn-in window with more than the stuck fraction rejected stops the run at once.
- At every sample and at the end: `judge` on the sampling steps; a stuck chain stops the run
  with one line (ChainNotMoving, exit != 0).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from rtllm.samplers import movement

PROBE_PER_SHARD = 256  # probed coordinates per shard, evenly spaced: a few KB per sample


class ChainNotMoving(RuntimeError):
    """The chain does not move: its samples would be copies, not an ensemble."""


def probe_indices(numel: int) -> slice:
    return slice(0, numel, max(1, numel // PROBE_PER_SHARD))


@torch.no_grad()
def probe_weights(shards) -> tuple[list[float], float]:
    """Probed fp32 positions of every shard, and the rms velocity per coordinate there."""
    xs, vs = [], []
    for shard in shards:
        sl = probe_indices(shard.numel)
        xs.append(shard.position(sl).double().cpu())
        vs.append(shard.v[sl].double().cpu())
    v = torch.cat(vs)
    return torch.cat(xs).tolist(), float(v.square().mean().sqrt())


def calibrate_guards(state: dict, batch_losses: list[float], cfg, tolerance: float,
                     say: Callable[[str], None], log: Callable[[dict], None]) -> None:
    """The guards' units, into the run state: the start's mean loss over the dt trials' batches,
    the spread of minibatch losses, and from them the undo threshold (an explicit one wins)."""
    n = min(len(batch_losses), cfg.dt_trial_steps)
    mean = sum(batch_losses[:n]) / n  # as SamplingRun._mean_loss: the dt trials' start
    centre = sum(batch_losses) / len(batch_losses)
    std = math.sqrt(sum((x - centre) ** 2 for x in batch_losses) / (len(batch_losses) - 1))
    given = cfg.reject_threshold
    threshold = None if given is None else \
        movement.undo_threshold(tolerance, std) if given == "auto" else float(given)
    state.update(start_loss=mean, batch_loss_std=std, reject_threshold=threshold)
    log({"type": "guards", "start_loss": mean, "batch_loss_std": std, "tolerance": tolerance,
         "reject_threshold": threshold})
    if threshold is not None:
        say(f"undo threshold {threshold:.3g} nats = {movement.in_tolerances(threshold, tolerance):.3g} x "
            f"tolerance ({'auto' if given == 'auto' else 'given'}; minibatch loss sigma {std:.3g})")


class MovementWatch:
    def __init__(self, state: dict, cfg, *, say: Callable[[str], None], log: Callable[[dict], None]) -> None:
        self.state, self.say, self.log = state, say, log
        self._given_burn_in = cfg.burn_in if isinstance(cfg.burn_in, int) else None  # "auto": decided later
        self.dt_auto = cfg.dt == "auto" and cfg.sampler == "ray"
        # MCLMC flags jumps and keeps the step (no undo): its tuning burn-in is not stopped early.
        self.undo_stops = cfg.sampler == "ray"
        self.more = "" if cfg.reject_threshold in ("auto", None) else ", or leave --reject-threshold at auto"
        self.s = state.setdefault("movement", dict(
            window_start=0, window_rejected=0, shrinks=0, counted_from=self._given_burn_in or 0, steps=0, rejected=0,
            last_probe=None, moves=[], heldout=[]))

    @property
    def burn_in(self) -> float:
        """The burn-in's end; with --burn-in auto infinite until rtllm.run.burn_in decides it."""
        decided = self.state.get("burn_in", self._given_burn_in)
        return math.inf if decided is None else decided

    def after_step(self, t: int, rejected: bool) -> bool:
        """Count step t; True when --dt auto shrank dt (state["dt"]) and the sampler must follow."""
        s, dt = self.s, self.state["dt"]
        if t >= s["counted_from"] and t >= self.burn_in:
            s["steps"] += 1
            s["rejected"] += rejected
        s["window_rejected"] += rejected
        adapting = self.dt_auto and t < self.burn_in + movement.DT_WINDOW
        if adapting and movement.dt_window_exceeded(s["window_rejected"]):
            self.state["dt"] = self._shrink(t, dt)
            return True
        if self.undo_stops and not self.dt_auto and t < self.burn_in and \
                s["window_rejected"] > movement.STUCK_REJECTED_FRACTION * movement.DT_WINDOW:
            raise ChainNotMoving(
                f"the chain is not moving: {s['window_rejected']} of the steps {s['window_start']}.."
                f"{t} of the burn-in were undone or flagged (the loss jumps by more than "
                f"--reject-threshold): use --dt auto or a smaller --dt (at most {dt / 10:g}){self.more}")
        if t + 1 - s["window_start"] >= movement.DT_WINDOW:
            s["window_start"], s["window_rejected"] = t + 1, 0
        return False

    def _shrink(self, t: int, dt: float) -> float:
        s = self.s
        if s["shrinks"] >= movement.DT_MAX_SHRINKS:
            raise ChainNotMoving(
                f"the chain is not moving: --dt auto shrank dt {s['shrinks']} times to {dt:.3g} and "
                f"still {s['window_rejected']} of {t + 1 - s['window_start']} steps were undone: lower "
                f"--loss-tolerance{self.more or ' or raise --reject-threshold'}")
        new = dt / movement.DT_SHRINK
        self.log({"type": "dt_shrink", "step": t, "dt_old": dt, "dt": new,
                  "rejected": s["window_rejected"], "window_steps": t + 1 - s["window_start"]})
        self.say(f"dt {dt:.4g} -> {new:.4g}: {s['window_rejected']} of {t + 1 - s['window_start']} "
                 f"steps undone (bound {movement.DT_UNDO_BOUND:.0%} of {movement.DT_WINDOW})")
        s["shrinks"] += 1
        s["window_start"], s["window_rejected"] = t + 1, 0
        # Steps taken with the old dt no longer count for the stuck verdict.
        s["counted_from"] = t + 1  # (and only sampling steps count: after_step)
        s["steps"] = s["rejected"] = 0
        return new

    def after_sample(self, index: int, step: int, shards, heldout_loss: float) -> None:
        """Record how far the sample moved from the previous one, then judge the chain."""
        probe, speed = probe_weights(shards)
        s = self.s
        record = {"type": "sample_movement", "index": index, "step": step, "step_move": self.state["dt"] * speed,
                  "heldout_loss": heldout_loss}
        if s["last_probe"] is not None:
            record["move"] = movement.rms_move(s["last_probe"], probe)
            s["moves"].append(record["move"])
        s["last_probe"] = probe
        s["heldout"].append(heldout_loss)
        s["step_move"] = record["step_move"]
        self.log(record)
        self.check()

    def check(self) -> movement.Verdict:
        s, dt = self.s, self.state["dt"]
        verdict = movement.judge(movement.Movement(
            sampling_steps=s["steps"], rejected_steps=s["rejected"], sample_moves=tuple(s["moves"]),
            step_move=s.get("step_move"), heldout_losses=tuple(s["heldout"])))
        if not verdict.moving:
            self.log({"type": "not_moving", "reason": verdict.reason})
            advice = (f"use --dt auto or a smaller --dt (at most {dt / 10:g}){self.more}" if "undone" in
                      verdict.reason else "use --dt auto, or a --dt at which the weights change")
            raise ChainNotMoving(f"the chain is not moving: {verdict.reason}; {advice} (the samples "
                                 f"written so far are no ensemble: rtllm evaluate refuses them)")
        return verdict


def sample_loss_is_absurd(loss: float, state: dict, tolerance: float) -> bool:
    start = state.get("start_loss")
    if start is None or not math.isfinite(start):
        return not math.isfinite(loss)
    return movement.is_absurd(loss, start, tolerance, state.get("batch_loss_std") or 0.0)
