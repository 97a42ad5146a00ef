"""`rtllm plan`: the options, and the command that prints rtllm.plan's table."""
from __future__ import annotations

import argparse
import math

from rtllm.state.layouts import DEFAULT_LAYOUT, LAYOUTS


def _size_arg(text: str) -> int:
    from rtllm.plan.format import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_plan_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--model", required=True, help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local "
      "model directory (only its config.json is read)")
    a("--batch", type=int, default=8, help="sequences per step (%(default)s)")
    a("--seq", type=int, help="tokens per sequence (default: the model's context)")
    a("--micro-batch", type=int, help="sequences per forward/backward (default: the whole batch)")
    a("--layout", choices=list(LAYOUTS), default=DEFAULT_LAYOUT, help="state layout the verdict is "
      "for; every registered layout gets a column (%(default)s)")
    a("--gpu-mem", type=_size_arg, default="24GiB", help="memory to fit in: 24GiB, 24GB or bytes "
      "(%(default)s)")
    a("--device", choices=["cuda", "cpu"], default="cuda", help="plan a GPU run (bf16 compute) or a "
      "CPU run (fp32) (%(default)s)")
    a("--params", help="regex of the sampled parameters, as rtllm sample --params (default: all)")
    a("--ray-per", choices=["model", "group", "tensor"], default="model", help="as rtllm sample (%(default)s)")
    a("--prior-center", choices=["zero", "start"], help="plan a Gaussian prior with this center "
      "(default: no prior)")
    a("--dt", default="auto", help="'auto' (as rtllm sample: its trials hold a device copy of x and v) "
      "or a number (%(default)s)")
    a("--undo", choices=["auto", "yes", "no"], default="auto", help="the copy of x and v that undoes a "
      "rejected step: 'auto' takes it, as rtllm sample does, when free memory exceeds twice its size")
    a("--activation-checkpoint-every", type=int, default=1, help="plan with the activations of every "
      "K-th transformer block recomputed in the backward pass, as `rtllm sample "
      "--activation-checkpoint-every` (%(default)s)")
    a("--sample-dtype", choices=["compute", "fp32"], default="compute", help="as rtllm sample (%(default)s)")
    a("--sampler", choices=["ray", "mclmc", "smile"], default="ray", help="as rtllm sample: SMILE keeps "
      "a copy of x for its rejections (4 bytes/parameter) (%(default)s)")
    a("--precondition", action="store_true", help="with --sampler smile: pSMILE's preconditioner "
      "(12 bytes/parameter)")
    a("--world-size", type=int, default=1, help="plan one chain sharded over W ranks (rtllm sample "
      "--shard-state under torchrun): bytes per rank (%(default)s)")


def cmd_plan(args: argparse.Namespace) -> int:
    from rtllm.lm.presets import config_for
    from rtllm.plan.format import fit_hints, format_plan
    from rtllm.plan.memory import model_shape, plan_all_layouts

    if args.dt != "auto":
        try:
            dt = float(args.dt)
        except ValueError:
            raise ValueError(f"--dt must be 'auto' or a number, got {args.dt!r}") from None
        if not math.isfinite(dt) or dt <= 0:
            raise ValueError(f"--dt must be 'auto' or a finite number > 0, got {args.dt!r}")
    config = config_for(args.model)
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    shape = model_shape(config, params=args.params, ray_per=args.ray_per, name=args.model)
    kwargs = dict(batch=args.batch, seq=args.seq or context, device=args.device,
                  micro_batch=args.micro_batch, prior_center=args.prior_center,
                  gpu_mem_bytes=args.gpu_mem, checkpoint_every=args.activation_checkpoint_every,
                  dt_auto=args.dt == "auto", sample_dtype=args.sample_dtype,
                  undo_backup={"auto": "auto", "yes": True, "no": False}[args.undo])
    if args.sampler != "ray" or args.precondition:
        if args.world_size != 1:
            raise ValueError("--sampler and --precondition are planned for one process; drop --world-size")
        if args.layout != "fp32":
            raise ValueError(f"--sampler {args.sampler} runs --layout fp32 only")
        kwargs.update(sampler=args.sampler, precondition=args.precondition)
    if args.world_size != 1:
        from rtllm.plan.sharded import format_sharded_plan, plan_sharded

        print(format_sharded_plan(plan_sharded(shape, world_size=args.world_size, **kwargs)))
        return 0
    plans = plan_all_layouts(shape, **kwargs)
    main = next(p for p in plans if p.layout == args.layout)
    hints = fit_hints(shape, main, {**kwargs, "layout": args.layout})
    print(format_plan(plans, args.gpu_mem, chosen=args.layout, hints=hints))
    return 0
