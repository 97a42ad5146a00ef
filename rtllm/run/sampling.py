"""The sampling run: a Hugging Face checkpoint and text in, an ensemble of weight samples out.

Target: ln p(x) = -S * (mean token cross-entropy of a minibatch) + ln prior(x), with
S from --scale (rtllm/run/likelihood_scale.py) unless --scale-likelihood is given. One
`SamplingRun` owns the model, the data, the sampler and the sample writer; `run()` tunes dt
(`--dt auto`), steps the chain, logs, takes samples, checkpoints, and resumes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from rtllm.run.burn_in import advance_auto_burn_in
from rtllm.run.verdict import report_verdict
from rtllm.run.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from rtllm.run.config import SampleConfig, chain_seed
from rtllm.run.host_scalar import HostScalar as _HostScalar
from rtllm.run.micro_batch import backing_off, whole_or_pieces
from rtllm.run.movement_watch import MovementWatch, sample_loss_is_absurd
from rtllm.run.recovery import check_listed_samples, claim_out_dir, prepare_resume, settings_differ
from rtllm.run.signals import stop_on_signals
from rtllm.run.step_size import StepSizeChoice
from rtllm.samplers import movement
from rtllm.run.likelihood_scale import run_likelihood_scale
from rtllm.lm.data import MinibatchOrder, TokenData, context_length, read_texts
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling, resolve_device, select_parameters
from rtllm.store.runlog import RunLog, peak_memory_bytes
from rtllm.run.sampler_setup import build_sampler, load_init_weights
from rtllm.store.delta import sample_disk_bytes
from rtllm.store.manifest import RUN_MARKER
from rtllm.store.writer import SampleWriter, check_free_disk, copy_tokenizer, estimate_run_disk
from rtllm.state.progress import Progress

PROBE_SEQUENCES, PROBE_POSITIONS, PROBE_TOP = 2, 64, 5
HELDOUT_EVAL_SEQUENCES = 8
CHECKPOINT_SECONDS = 600.0


def prepare_out_dir(cfg: SampleConfig, resume: bool, overwrite: bool):
    """Check, lock and (--overwrite) clear the output directory; the held lock (recovery.py)."""
    return claim_out_dir(cfg.out_dir, resume=resume, overwrite=overwrite)


class SamplingRun(StepSizeChoice):
    def __init__(self, cfg: SampleConfig, *, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, log
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton launches and torch's default stream follow the *current* device: under
            # torchrun (rank k -> cuda:k) or with --device cuda:1 it must be this run's GPU.
            torch.cuda.set_device(self.device)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # Load (and validate) everything before touching the output directory.
        # fp32-split keeps its position's high plane as the bf16 weights: bf16 on CPU too.
        dtype = torch.bfloat16 if self.device.type == "cuda" or cfg.layout == "fp32-split" \
            else torch.float32
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype, device=self.device)
        if cfg.init:
            load_init_weights(self.model, cfg.init)
        prepare_for_sampling(self.model, checkpoint_every=cfg.activation_checkpoint_every)
        self.data = TokenData.from_texts(self.tokenizer, read_texts(cfg.train, cfg.encoding),
                                         heldout=read_texts(cfg.heldout, cfg.encoding) if cfg.heldout else None,
                                         seq_len=cfg.seq_len, context=context_length(self.model))
        self.order = MinibatchOrder(len(self.data.train), cfg.batch_size, chain_seed(cfg.seed, cfg.chain))
        sampled, _ = select_parameters(self.model, cfg.params)  # the rest no longer require grad
        self.num_params = sum(p.numel() for _, p in sampled)
        self.scale = run_likelihood_scale(cfg, self.num_params, train_tokens=self.data.train[:, 1:].numel())
        self.tolerance = self.num_params / (2 * self.scale)
        self.sampler = self._build_sampler(sampled)
        auto_burn_in = cfg.burn_in == "auto"  # decided in the loop; until then, the most samples
        self.n_samples = len(range((0 if auto_burn_in else cfg.burn_in) + cfg.thin - 1, cfg.steps, cfg.thin))
        # Undo needs a copy of x and v; decided once and kept in checkpoints, so a resumed run
        # takes the same path whatever memory is free then. MCLMC flags instead: undoing one of
        # its half steps would break the McLachlan step it belongs to.
        undo = cfg.reject_threshold is not None and cfg.sampler == "ray" and self._backup_fits()
        # micro_batch: the one in use (None: whole minibatches); lowered on out-of-memory errors
        self.state = dict(step=0, cursor=0, dt=None, L=None, dt_trials=[], prev_loss=None, flagged=[],
                          undo=undo, burn_in=None if auto_burn_in else cfg.burn_in, burn_in_heldout=[],
                          micro_batch=cfg.micro_batch)
        self.log = self.writer = None  # the log once the output directory is ours, the writer in run()
        start_loss = self._mean_loss([0])
        if not math.isfinite(start_loss):
            raise ValueError(f"the loss is {start_loss} at the starting weights: check the model and "
                             f"the text (nothing was written)")
        self._check_disk()  # before --overwrite removes anything
        self._lock = self._claim_out_dir(resume, overwrite)  # held until run() ends
        try:
            self.ckpt_path = checkpoint_path(cfg.out_dir, cfg.chain)
            self._backup = self._make_backup() if undo else None
            # The probe follows the *starting* model's top tokens: built before a checkpoint loads.
            self.probe = self._make_probe()
            self.resumed = False
            if resume:
                prepare_resume(cfg.out_dir, cfg.chain)
                self._load_checkpoint()
            (cfg.out_dir / RUN_MARKER).write_text(json.dumps(self.manifest_config(), indent=2))
            copy_tokenizer(cfg.model, cfg.out_dir)
            self.log = RunLog(cfg.out_dir / f"log-chain-{cfg.chain:03d}.jsonl")
        except BaseException:
            self._lock.release()
            raise

    # -- set-up helpers ---------------------------------------------------------------------
    def _claim_out_dir(self, resume: bool, overwrite: bool):
        return prepare_out_dir(self.cfg, resume, overwrite)

    def _build_sampler(self, sampled: list):
        return build_sampler(self.cfg, sampled, self.scale, chain_seed(self.cfg.seed, self.cfg.chain))

    def _make_writer(self) -> SampleWriter:
        frozen = {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return SampleWriter(self.cfg.out_dir, model_config=self.model.config,
                            named_tensors=self._named_tensors(), frozen=frozen,
                            sample_dtype=torch.float32 if self.cfg.sample_dtype == "fp32" else None,
                            run_config=self.manifest_config(),
                            generation_config=getattr(self.model, "generation_config", None),
                            sample_format=self.cfg.sample_format)

    def manifest_config(self) -> dict:
        """What defines the samples; stored in the manifest and in every sample's metadata.

        Paths of the output and timing-like settings stay out, so a resumed run (or the same
        run in another directory) writes byte-identical sample files. micro_batch is the one in
        use (rtllm/run/micro_batch.py): after a back-off, the size the gradients are taken at.
        """
        return {**self.cfg.chain_defining(), "micro_batch": self.state.get("micro_batch", self.cfg.micro_batch),
                "num_params": self.num_params, "scale_likelihood": self.scale,
                "loss_tolerance_effective": self.tolerance, "dt": self.state["dt"],
                **({"L": self.state["L"]} if self.cfg.sampler == "mclmc" else {})}

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """HF state-dict names -> live tensors: the compute copy, or the fp32 master weights."""
        named = dict(self.model.state_dict())
        if self.cfg.sample_dtype == "fp32":
            masters = {id(p): fg.view("x", i) for fg in self.sampler._flat for i, p in enumerate(fg.params)}
            for name, p in self.model.named_parameters(remove_duplicate=False):  # tied names too
                if id(p) in masters:
                    named[name] = masters[id(p)]
        return named

    def _check_disk(self) -> None:
        per_sample, once = sample_disk_bytes(self.model, self.cfg.sample_format, fp32=self.cfg.sample_dtype == "fp32")
        per_param = 8 * (2 if self.state["undo"] else 1) + (2 if self.cfg.prior_center == "start" else 0)
        # x2: a new checkpoint is written next to the old one before it replaces it.
        need = once + estimate_run_disk(per_sample, self.n_samples, 2 * self.num_params * per_param)
        check_free_disk(self.cfg.out_dir, need, what=f"{self.n_samples} samples"
                        f"{'' if once == 0 else ' (' + self.cfg.sample_format + '), the start'} and a checkpoint")

    def _backup_fits(self) -> bool:
        """Undoing a rejected step needs a copy of x and v (8 bytes/parameter)."""
        need = self.num_params * 8
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] > 2 * need
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
        return avail > 4 * need

    def _make_backup(self):
        return [(s.position(copy=True), s.v.clone()) for s in self.sampler.shards]

    def _make_probe(self) -> dict:
        """A fixed held-out batch and, per position, the starting model's top-5 next tokens."""
        seqs = self.data.heldout[:PROBE_SEQUENCES, : PROBE_POSITIONS + 1].to(self.device)
        probs = self._next_token_probs(seqs[:, :-1])
        top = probs.topk(PROBE_TOP, dim=-1).indices
        return {"inputs": seqs[:, :-1], "top_ids": top}

    # -- model evaluations ------------------------------------------------------------------
    @torch.no_grad()
    def _next_token_probs(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(inputs).logits.float(), dim=-1)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        seqs = self.data.heldout[:HELDOUT_EVAL_SEQUENCES].to(self.device)
        return float(lm_loss(self.model, seqs[:, :-1], seqs[:, 1:]))

    def _loss_and_grad(self, cursor: int) -> tuple[float, int]:
        """Minibatch loss at the current weights; gradients land in the sampler's buffer."""
        loss, tokens = self._loss_and_grad_on_device(cursor)
        return float(loss), tokens

    def _next_batch(self) -> int:
        """The cursor of the next gradient's minibatch. MCLMC: both gradients of a full step
        share one (the step then integrates one potential), so only a start call moves on."""
        if self.cfg.sampler in ("mclmc", "smile") and self.sampler.phase in ("mid", "mid_close"):
            return self.state["cursor"] - 1
        self.state["cursor"] += 1
        return self.state["cursor"] - 1

    @torch.no_grad()
    def _batch_loss(self, cursor: int) -> torch.Tensor:
        """The minibatch's loss in one forward (as before the back-off existed, whatever the
        micro-batch); only if that runs out of memory, in pieces (run/micro_batch.py)."""
        seqs = self._minibatch(cursor)
        return whole_or_pieces(lambda p: lm_loss(self.model, p[:, :-1], p[:, 1:]), seqs, self.state,
                               self._backed_off)

    def _minibatch(self, cursor: int) -> torch.Tensor:
        seqs = self.data.train[self.order.batch(cursor)]
        if self.device.type == "cuda":  # from pageable memory the copy would wait for the GPU
            return seqs.pin_memory().to(self.device, non_blocking=True)
        return seqs.to(self.device)

    def _loss_and_grad_on_device(self, cursor: int) -> tuple[torch.Tensor, int]:
        """As _loss_and_grad, the loss left on the device (float64 scalar): reading it syncs.
        Out of memory: the same minibatch again in smaller micro-batches (run/micro_batch.py)."""
        seqs = self._minibatch(cursor)
        loss = backing_off(lambda micro: self._accumulate(seqs, micro), self.state, len(seqs),
                           self._backed_off)
        return loss, seqs[:, 1:].numel()

    def _backed_off(self, failed: list[int], fits: int) -> None:
        st = self.state
        also = f" ({', '.join(map(str, failed[1:]))} did not fit either)" if len(failed) > 1 else ""
        self.say(f"out of memory at a micro-batch of {failed[0]} sequences (step {st['step']}): backed off "
                 f"to {fits}{also}; the run and its resumes keep {fits}")
        if self.log is not None:
            self.log.write({"type": "micro_batch", "step": st["step"], "from": failed[0], "to": fits})
        if self.writer is not None:  # the samples from here on say how their gradients were taken
            self.writer.update_config(self.manifest_config())

    def _accumulate(self, seqs: torch.Tensor, micro: int) -> torch.Tensor:
        """The minibatch's loss, its gradient in the sampler's buffer, `micro` sequences at a time."""
        self.sampler.zero_grad()
        shards = self.sampler.shards
        # bf16 gradients of several micro-batches are accumulated in fp32.
        acc = [torch.zeros_like(s.g, dtype=torch.float32) for s in shards] \
            if micro < len(seqs) and shards[0].g.dtype != torch.float32 else None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for part in seqs.split(micro):
            loss = lm_loss(self.model, part[:, :-1], part[:, 1:]) * (len(part) / len(seqs))
            loss.backward()
            total += loss.detach().double()  # the float64 sum that Python floats gave, no sync
            if acc is not None:
                for a, s in zip(acc, shards):
                    a.add_(s.g.float())
                    s.g.zero_()
        if acc is not None:
            for a, s in zip(acc, shards):
                s.g.copy_(a)
        return total

    # -- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        self.writer.flush()  # a checkpoint at step t promises every sample up to t is on disk
        save_checkpoint(self.ckpt_path, {
            "config": self.cfg.chain_defining(), "state": self.state,
            "sampler": self.sampler.state_dict(),
            "backup": self._backup,
        })
        self.log.write({"type": "checkpoint", "step": self.state["step"]})

    def _load_checkpoint(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt is None:
            earlier = (self.cfg.out_dir / RUN_MARKER).exists()  # written after this, by every run
            self.say(f"no checkpoint of an earlier run in {self.cfg.out_dir} yet: starting at step 0"
                     if earlier else f"starting a new run in {self.cfg.out_dir}")
            return
        diff = settings_differ(ckpt["config"], self.cfg.chain_defining())
        if diff:
            raise ValueError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)}); "
                             f"resume with the same ones, or start a new run with --overwrite")
        self.sampler.load_state_dict(ckpt["sampler"])
        self.state = ckpt["state"]
        self.state.setdefault("micro_batch", self.cfg.micro_batch)  # a checkpoint from before the back-off
        self._backup = None
        if self.state["undo"]:  # the original run undid rejected steps: so does its resume
            self._backup = [(cx.to(self.device, copy=True), cv.to(self.device, copy=True))  # not views of the file
                            for cx, cv in ckpt["backup"]]
        check_listed_samples(self.cfg.out_dir, self.cfg.chain, self.state["step"])
        self.resumed = True
        if self.state["step"] >= self.cfg.steps and self.state.get("sample_due") is None:
            self.say(f"already complete: the run in {self.cfg.out_dir} took all {self.cfg.steps} steps; "
                     f"nothing to do")
        else:
            self.say(f"resuming at step {self.state['step']} of {self.cfg.steps} ({self.ckpt_path})")

    # -- the loop -------------------------------------------------------------------------
    def _undo_last_step(self) -> None:
        """Restore x and v from before the last update and reverse v (the ray bounces back)."""
        self.writer.wait_snapshot()  # the side-stream copy of the last sample may still read them
        for shard, (bx, bv) in zip(self.sampler.shards, self._backup):
            shard.set_position(bx)  # and the compute copy (or, fp32-split, both planes)
            shard.v.copy_(bv).neg_()

    def run(self) -> Path:
        cfg, st = self.cfg, self.state
        self.writer = self._make_writer()
        try:
            with self.writer, stop_on_signals(cfg.out_dir) as self._stop:
                self._calibrate_guards()
                self.watch = MovementWatch(st, cfg, say=self.say, log=self.log.write)
                if st["dt"] is None:
                    st["dt"] = self.choose_dt()
                    self.writer.update_config(self.manifest_config())
                self._set_dt(st["dt"])
                self._loop()
                self._finish_writes()
                self._save_checkpoint()
                self.watch.check()
            self.n_samples = len(range(self.state["burn_in"] + cfg.thin - 1, cfg.steps, cfg.thin))
            report_verdict(self.log, self.say)
        finally:
            self.log.close()
            self._lock.release()
        self.say(f"done: {self.n_samples} samples in {cfg.out_dir / 'samples'}, manifest "
                 f"{cfg.out_dir / 'ensemble.json'}, log {self.log.path}")
        return cfg.out_dir

    def _finish_writes(self, poll_s: float = 0.2, quiet_s: float = 1.0) -> None:
        """The writer thread may still hold the last samples (seconds each at GPT-2 XL): past
        `quiet_s`, show the wait as a phase of its own."""
        quiet_until = time.monotonic() + quiet_s
        while self.writer.pending and time.monotonic() < quiet_until:
            time.sleep(poll_s)
        total = self.writer.pending
        if total:
            with Progress(total, "writing the last samples", unit="sample") as bar:
                while (done := total - self.writer.pending) < total:
                    bar.update(done - bar.done)
                    time.sleep(poll_s)
                bar.update(total - bar.done)

    def _loop(self) -> None:
        cfg, st = self.cfg, self.state
        last_ckpt = time.monotonic()
        bar = Progress(cfg.steps, "sampling", initial=st["step"])  # a bar, or a line every 10 s
        # An MCLMC sample waits for its full step's end when a divergence restarted a step off the
        # even grid (MCLMC._diverge): the run then takes one gradient more for it.
        while st["step"] < cfg.steps or st.get("sample_due") is not None:
            t = st["step"]
            burn_in = st["burn_in"] if st["burn_in"] is not None else cfg.steps  # auto: not decided yet
            t0 = time.perf_counter()
            loss, tokens = self._loss_and_grad_on_device(self._next_batch())
            stepped = self._backup is None
            if stepped:
                # Without an undo copy the step is taken whatever the loss (a jump only flags the
                # samples after it): read the loss after the step, whose sync for the scalar rule
                # has brought it over by then. One host sync per step instead of two.
                loss = _HostScalar(loss)
                self._sampler_step(loss)
            loss = float(loss)
            record = {"type": "step", "step": t, "loss": loss, "dt": st["dt"],
                      "phase": "burn-in" if t < burn_in else "sampling"}
            jump = movement.is_jump(st["prev_loss"], loss, st["reject_threshold"])
            undo = jump and self._backup is not None
            if jump:
                record["rejected"] = "undone" if undo else "flagged for masking"
            if undo:
                self._undo_last_step()
            else:
                if jump:  # no room to undo: keep the step, mask the samples that follow it
                    st["flagged"].append(t)
                if self._backup is not None:
                    for shard, (bx, bv) in zip(self.sampler.shards, self._backup):
                        bx.copy_(shard.position())
                        bv.copy_(shard.v)
                if not stepped:
                    self._sampler_step(loss)
                st["prev_loss"] = loss
                record.update(self.sampler.last_info, ln_luminosity=self.sampler.ln_luminosity)
            st["step"] = t + 1
            if self.watch.after_step(t, jump):  # --dt auto shrank dt: too many undos
                self._set_dt(st["dt"])
                self.writer.update_config(self.manifest_config())
            is_sample = t < cfg.steps and t >= burn_in and (t - burn_in + 1) % cfg.thin == 0
            sample_t = None
            off_grid = cfg.sampler in ("mclmc", "smile") and self.sampler.phase != "start"
            if is_sample and off_grid:
                st["sample_due"] = t
            elif is_sample:
                sample_t = t
            elif st.get("sample_due") is not None and not off_grid:
                sample_t, st["sample_due"] = st["sample_due"], None
            need_heldout = sample_t is not None or t % cfg.log_every == 0 or t + 1 == cfg.steps
            if need_heldout:
                record["heldout_loss"] = self.heldout_loss()
            if st["burn_in"] is None:
                advance_auto_burn_in(st, t, record.get("heldout_loss"), cfg.steps, self.say)
            if t % cfg.log_every == 0 or t + 1 == cfg.steps:
                self._log_probe(t)
            if sample_t is not None:
                index = (sample_t - burn_in + 1) // cfg.thin - 1
                kept_loss = st["prev_loss"] if undo else loss  # after an undo: the kept weights' loss
                masked = any(sample_t - cfg.thin < f <= t for f in st["flagged"]) or \
                    sample_loss_is_absurd(kept_loss, st, self.tolerance)
                self.writer.submit(index=index, chain=cfg.chain, step=t + 1, loss=kept_loss,
                                   heldout_loss=record["heldout_loss"], masked=masked)
                self.watch.after_sample(index, t + 1, self.sampler.shards, record["heldout_loss"])
            record["tokens_per_s"] = tokens / (time.perf_counter() - t0)
            record["peak_memory_bytes"] = peak_memory_bytes(self.device)
            self.log.write(record)
            held = {"heldout": f"{record['heldout_loss']:.3f}"} if "heldout_loss" in record else {}  # the last one
            bar.update(1, loss=f"{loss:.3f}", **held, angle=f"{record.get('angle', 0.0):.2e}")
            due = (st["step"] % cfg.checkpoint_every == 0) if cfg.checkpoint_every else \
                time.monotonic() - last_ckpt > CHECKPOINT_SECONDS
            if due and st["step"] < cfg.steps:
                self._save_checkpoint()
                last_ckpt = time.monotonic()
            if self._stop.requested:  # SIGINT/SIGTERM: stop here, at a safe point
                bar.close()
                self._save_checkpoint()
                self._stop.stop_now(st["step"])
        bar.close()

    def _sampler_step(self, loss) -> None:
        self.writer.wait_snapshot()  # the update must not overwrite a sample mid-copy
        if self.cfg.sampler == "smile":  # its controller reads each full step's energy error, whose
            # two ends are scored on the step's minibatch: one extra forward pass per full step
            cursor = self.state["cursor"]
            start = self.sampler.phase == "start" and cursor >= 2
            self.sampler.step(loss=loss, end_loss=self._batch_loss(cursor - 2) if start else None)
        elif self.cfg.sampler == "mclmc":
            self.sampler.step(loss=loss)  # the loss tracks MCLMC's energy
        else:
            self.sampler.step()

    def _log_probe(self, step: int) -> None:
        probs = self._next_token_probs(self.probe["inputs"])
        picked = probs.gather(-1, self.probe["top_ids"])
        self.log.write({"type": "probe", "step": step,
                        "probs": [[round(float(p), 7) for p in row] for row in picked.reshape(-1, PROBE_TOP)]})


def sample(cfg: SampleConfig, *, resume: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = print) -> Path:
    """Run a sampling job end to end; returns the output directory."""
    return SamplingRun(cfg, resume=resume, overwrite=overwrite, log=log).run()
