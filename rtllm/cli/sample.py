"""`rtllm sample` and `rtllm merge`: the options, SampleConfig from them, and the commands."""
from __future__ import annotations

import argparse

from rtllm.run.config import DEFAULT_LOSS_TOLERANCE, SampleConfig
from rtllm.state.layouts import LAYOUTS


def _dt(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number, got {text!r}") from None


def _threshold(text: str) -> float | str | None:
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'off' or a number of nats, got {text!r}") from None


def add_sample_args(p: argparse.ArgumentParser) -> None:
    d = SampleConfig.__dataclass_fields__
    a = p.add_argument
    a("--model", required=True, help="local Hugging Face causal-LM directory (config, weights, tokenizer)")
    a("--train", nargs="+", required=True, help="training text: files or directories of text files")
    a("--out", required=True, help="output directory for the ensemble (samples/, ensemble.json, log)")
    a("--heldout", nargs="+", default=[], help="held-out text (default: the last 5%% of the training text, "
      "excluded from training)")
    a("--steps", type=int, default=d["steps"].default, help="total sampler steps, burn-in included (%(default)s)")
    a("--burn-in", type=_burn_in, default=d["burn_in"].default, help="steps before the first sample, dt "
      "trials included, or 'auto': until the held-out loss stops trending, at most half of --steps "
      "(%(default)s)")
    a("--thin", type=int, default=d["thin"].default, help="take a sample every THIN steps after burn-in (%(default)s)")
    a("--dt", type=_dt, default="auto", help="time step, or 'auto' to choose it by the paper's recipe (%(default)s)")
    a("--loss-tolerance", type=float, help=f"nats per token the posterior may sit above the optimum; sets "
      f"S = D/(2*tol) (default: {DEFAULT_LOSS_TOLERANCE})")
    a("--scale-likelihood", type=float, help="S in ln p = -S * mean token loss (instead of --loss-tolerance)")
    a("--scale", choices=["tolerance", "tokens", "tempered"], default=d["scale"].default,
      help="S when not given: D/(2*tol) (the paper's), the number of training tokens, or their "
      "geometric mean (%(default)s: docs/uncertainty.md)")
    a("--prior-scale", type=float, help="std of an isotropic Gaussian prior on the weights (default: none)")
    a("--prior-center", choices=["zero", "start"], default="zero", help="prior mean: zero, or the starting "
      "weights (+2 bytes/parameter) (%(default)s)")
    a("--batch-size", type=int, default=d["batch_size"].default, help="sequences per step (%(default)s)")
    a("--micro-batch", type=int, help="sequences per forward/backward; gradients accumulate in fp32 (in float64 "
      "with --shard-state, as its ranks' gradients are summed)")
    a("--seq-len", type=int, help="tokens per sequence (default: the model's context length)")
    a("--refresh-rate", type=float, default=d["refresh_rate"].default, help="partial velocity refresh per "
      "unit time (%(default)s)")
    a("--params", help="regex: sample only the parameters whose names match; the rest stay frozen")
    a("--ray-per", choices=["model", "group", "tensor"], default=d["ray_per"].default,
      help="one ray for the model, per layer group, or per tensor (%(default)s)")
    a("--reject-threshold", type=_threshold, default=d["reject_threshold"].default, help="a step whose loss "
      "jumps by more than this (nats) is undone, or its samples masked; 'auto': 5 x the loss tolerance + "
      "6 sigma of the minibatch loss difference (docs/sampling.md, Guards); 'off' (%(default)s)")
    a("--log-every", type=int, default=d["log_every"].default, help="held-out loss and probe every N steps "
      "(%(default)s)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (default: about every 10 minutes)")
    a("--activation-checkpoint-every", type=int, default=d["activation_checkpoint_every"].default,
      help="memory against time: the backward pass recomputes the activations of every K-th "
      "transformer block instead of keeping them. 1 recomputes every block (least memory, one extra "
      "forward pass); 2 every second block (faster, more memory) (default: %(default)s; `rtllm plan` "
      "takes the same option)")
    a("--sample-dtype", choices=["compute", "fp32"], default="compute", help="store samples in the compute "
      "dtype (bf16 on GPU) or as fp32 master weights (%(default)s)")
    a("--sample-format", choices=["safetensors", "delta8", "nf4"], default="safetensors",
      help="safetensors: each sample a from_pretrained directory; delta8 / nf4: the offset from the "
      "start quantized blockwise to 8 / 4 bits with bitsandbytes (~0.51x / 0.28x of bf16), the start "
      "stored once; rtllm evaluate reads them, rtllm export expands them (%(default)s)")
    a("--layout", choices=sorted(LAYOUTS), default=d["layout"].default, help="sampler state layout: fp32, "
      "or fp32-split: the same chain in 10 instead of 12 bytes/parameter, the model computing in "
      "bf16 (docs/precision.md) (%(default)s)")
    a("--seed", type=int, default=0, help="seed of the chain (%(default)s); chain k > 0 derives its own "
      "from (seed, k)")
    a("--chain", type=int, help="chain id K: write OUT/chains/chain-K (several chains, one ensemble; see "
      "`rtllm merge`); under torchrun rank r runs chain K + r (default: 0)")
    a("--sampler", choices=["ray", "mclmc", "smile"], default=d["sampler"].default, help="ray tracing, "
      "microcanonical Langevin as inside MILE (then --dt is its step size per full step of two "
      "gradients), or SMILE, MCLMC for minibatches (--dt its initial step size) (%(default)s)")
    a("--precondition", action="store_true", help="with --sampler smile: pSMILE, a diagonal "
      "preconditioner from an EMA of the gradient's mean and variance (12 more bytes/parameter)")
    a("--precondition-clip", choices=["relative", "absolute"], default=d["precondition_clip"].default,
      help="pSMILE's clip of the gradient scale s: relative ([0.1, 100] x rms(s)) or the SMILE "
      "authors' absolute [1e-2, 1e4], which diverges on LMs (docs/smile.md) (%(default)s)")
    a("--L", type=_dt, default="auto", help="MCLMC decoherence length, or 'auto': tuned in the burn-in "
      "(%(default)s)")
    a("--tune-phases", type=int, nargs=3, metavar=("I", "II", "III"), help="MCLMC tuning phases in full "
      "steps (default: 80/10/10%% of the burn-in; MILE uses 40000 5000 5000)")
    a("--mclmc-target", choices=["unbiased", "mile"], default=d["mclmc_target"].default,
      help="MCLMC tuner's energy-variance schedule: unbiased (1e-4 -> 2e-6), or MILE's 0.5 -> 0.1, "
      "biased on Gaussians (%(default)s: rtllm mile uses mile)")
    a("--starts", type=int, default=1, help="K > 1: K chains from K starts (members fine-tuned from "
      "--model with AdamW under their own seeds, as `rtllm mile` does), merged into one ensemble "
      "in OUT/chains; `rtllm evaluate` reports within- and between-chain uncertainty (%(default)s)")
    a("--init", help="start from the weights in this directory (same architecture as --model)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (%(default)s)")
    a("--encoding", help="encoding of the text files, e.g. latin-1 (default: UTF-8; text that does not "
      "decode is refused)")
    a("--deterministic", action="store_true", help="deterministic CUDA kernels (bit-identical resume on GPU)")
    a("--shard-state", action="store_true", help="one chain over all W torchrun ranks: model and sampler "
      "state sharded with FSDP2, each rank B/W of the B sequences of every minibatch, exact per-ray "
      "sums. Bit for bit the chain of `rtllm sample --shard-state --micro-batch B/W` (same options) "
      "on one process, for any W at that B/W; it differs from the one-process chain without "
      "--shard-state (whole-batch gradient, fast sums) only at rounding level (docs/sharding.md)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--overwrite", action="store_true", help="replace an earlier rtllm run in --out")


def _burn_in(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--burn-in must be a number of steps or 'auto', got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    return SampleConfig(
        model=args.model, train=tuple(args.train), out=args.out, heldout=tuple(args.heldout),
        steps=args.steps, burn_in=args.burn_in, thin=args.thin, dt=args.dt,
        loss_tolerance=args.loss_tolerance, scale_likelihood=args.scale_likelihood, scale=args.scale,
        prior_scale=args.prior_scale, prior_center=args.prior_center, batch_size=args.batch_size,
        micro_batch=args.micro_batch, seq_len=args.seq_len, refresh_rate=args.refresh_rate,
        params=args.params, ray_per=args.ray_per, reject_threshold=args.reject_threshold,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        sample_dtype=args.sample_dtype, sample_format=args.sample_format, activation_checkpoint_every=args.activation_checkpoint_every,
        layout=args.layout, seed=args.seed, device=args.device,
        deterministic=args.deterministic, sampler=args.sampler, L=args.L,
        tune_phases=tuple(args.tune_phases) if args.tune_phases else None, init=args.init,
        encoding=args.encoding, mclmc_target=args.mclmc_target, shard_state=args.shard_state,
        precondition=args.precondition, precondition_clip=args.precondition_clip)


def cmd_sample(args: argparse.Namespace) -> int:
    from rtllm.run.chains import Launch, run_sample

    if args.starts != 1:
        if args.shard_state:
            raise ValueError("--starts K runs K independent chains; --shard-state shards one: drop one of them")
        return _run_starts(args)
    cfg = config_from_args(args)
    if cfg.shard_state and args.chain is not None:
        raise ValueError("--shard-state runs one chain over all ranks in --out; drop --chain")
    if cfg.shard_state:  # one chain over all ranks
        from rtllm.run.sharded_run import run_sharded

        run_sharded(cfg, launch=Launch.from_env(), resume=args.resume, overwrite=args.overwrite,
                    argv=getattr(args, "argv", None))
        return 0
    run_sample(cfg, first_chain=args.chain, resume=args.resume, overwrite=args.overwrite)
    return 0


def _run_starts(args: argparse.Namespace) -> int:
    """--starts K: `rtllm mile` with the chosen sampler and the default member training."""
    from rtllm.run.config import MemberTraining
    from rtllm.run.mile import MileConfig, run_mile

    if isinstance(args.starts, bool) or args.starts < 1:
        raise ValueError(f"--starts must be an integer >= 1, got {args.starts!r}")
    if args.chain is not None or args.init is not None:
        raise ValueError("--starts K numbers its chains by start and makes the starts: drop --chain and --init")
    run_mile(MileConfig(members=args.starts, sampling=config_from_args(args), training=MemberTraining()),
             resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from rtllm.run.merge import merge

    report = merge(args.dir, require_all=args.require_all, verify=not args.no_verify)
    for state in report.chains:
        print(state.describe())
    print(report.summary())
    return 0
