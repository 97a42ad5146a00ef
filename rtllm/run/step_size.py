"""How a run chooses its step size: `--dt auto` trials, the guards' units, MCLMC's tuning.

A mixin of `rtllm.run.sampling.SamplingRun` (it uses the run's sampler, batches, state and
log): the step-size choice sits here so the loop module stays about the loop. The trials' rule
is `rtllm.run.dt_auto`; the guards are calibrated by `rtllm.run.movement_watch`.
"""
from __future__ import annotations

import errno
import math

import torch

from rtllm.run import dt_auto
from rtllm.run.checkpoint import load_checkpoint, save_checkpoint, trial_snapshot_path
from rtllm.run.movement_watch import calibrate_guards
from rtllm.run.sampler_setup import needs_tuning, tune_in_burn_in
from rtllm.samplers import movement


class StepSizeChoice:
    def _trial(self, dt: float, start: float) -> dt_auto.Trial:
        """A few steps from the current state on fixed batches, then everything restored.

        start: the mean loss of the current state on those batches (the same for every trial).
        """
        # The snapshot of the state goes to disk, in slices of at most 64 MiB both ways
        # (rtllm.run.checkpoint): a device copy (8 bytes/parameter, 11.6 GiB at GPT-2 XL) would not
        # fit a 24 GB card next to the state, and a host copy would double a PC's host memory.
        if self.writer is not None:  # the trial steps write the weights in place
            self.writer.wait_snapshot()
        snapshot = trial_snapshot_path(self.ckpt_path)
        try:
            save_checkpoint(snapshot, self.sampler.state_dict(), durable=False)  # scratch: no fsync
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise OSError(errno.ENOSPC, f"the dt-auto trials park the sampler state in {snapshot.parent} "
                          f"and the disk is full: free space there, or give a fixed --dt") from None
        try:
            cursors = range(self.cfg.dt_trial_steps)
            self._set_dt(dt)
            prev, jumps = None, 0  # steps the run would undo: the chosen dt must not need the undo
            for c in cursors:
                loss, _ = self._loss_and_grad(c)
                jumps, prev = jumps + movement.is_jump(prev, loss, self.state["reject_threshold"]), loss
                if not math.isfinite(loss):
                    break
                self.sampler.step()
            end = self._mean_loss(cursors) if math.isfinite(loss) else math.inf
            self.sampler.load_state_dict(load_checkpoint(snapshot))
        finally:
            snapshot.unlink(missing_ok=True)
        trial = dt_auto.Trial(dt=dt, start_loss=start, end_loss=end, jumps=jumps,
                              stable=dt_auto.is_stable(start, end, self.tolerance, jumps=jumps))
        self.log.write({"type": "dt_trial", **trial.__dict__})
        self.say(f"  dt trial {dt:.3g}: loss {start:.4f} -> {end:.4f} "
                 f"({dt_auto.describe(trial, self.tolerance)})")
        return trial

    @torch.no_grad()
    def _mean_loss(self, cursors) -> float:
        losses = [float(self._batch_loss(c)) for c in cursors]
        return sum(losses) / len(losses)

    def _set_dt(self, dt: float) -> None:
        if self.cfg.sampler == "smile":  # its controller owns the step size (kept in checkpoints)
            return
        for group in self.sampler.param_groups:
            group["dt"] = dt
        if self.state.get("L") is not None:  # MCLMC: L rides along as its refresh rate
            self.sampler.L = self.state["L"]

    def _calibrate_guards(self) -> None:
        if "reject_threshold" not in self.state:  # the guards' units (docs/sampling.md, "Guards")
            losses = [float(self._batch_loss(c)) for c in range(max(2, self.cfg.dt_trial_steps))]
            calibrate_guards(self.state, losses, self.cfg, self.tolerance, self.say, self.log.write)

    def choose_dt(self) -> float:
        if self.cfg.sampler == "mclmc":
            return self._tune_mclmc()
        if self.cfg.sampler == "smile":
            return self.sampler.step_size
        if self.cfg.dt != "auto":
            return float(self.cfg.dt)
        self.say(f"choosing dt (--dt auto): trials of {self.cfg.dt_trial_steps} steps from "
                 f"dt0 = 0.03/sqrt(D), tolerance {self.tolerance:.3g} nats")
        self._calibrate_guards()
        start = self.state["start_loss"]  # the mean loss over the trials' batches
        dt, trials = dt_auto.search_dt(lambda dt: self._trial(dt, start), dt_auto.initial_dt(self.num_params))
        self.state["dt_trials"] = [t.__dict__ for t in trials]
        self.say(f"dt = {dt:.4g} ({len(trials)} trials; "
                 f"{dt_auto.describe(next(t for t in trials if t.dt == dt), self.tolerance)})")
        return dt

    def _tune_mclmc(self) -> float:
        """MCLMC's step size (and L in state['L']): tuned on the first burn-in gradients, or given."""
        st = self.state
        if needs_tuning(self.cfg):
            def next_loss() -> tuple[torch.Tensor, torch.Tensor | None]:
                # The tuner reads the energy change of each full step, so both of its ends are
                # scored on the step's own minibatch: one extra forward pass per full step.
                start = self.sampler.phase == "start"
                end = self._batch_loss(st["cursor"] - 1) if start and st["cursor"] > 0 else None
                loss, _ = self._loss_and_grad_on_device(self._next_batch())
                st["step"] += 1
                return loss, end

            eps, L, record = tune_in_burn_in(self.cfg, self.sampler, next_loss, self.say)
            self.log.write(record)
        else:
            eps, L = float(self.cfg.dt), float(self.cfg.L)
        st["L"] = L
        return eps
