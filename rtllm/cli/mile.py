"""`rtllm mile`: the `rtllm sample` options plus the members' training, and the command."""
from __future__ import annotations

from rtllm.run.config import MemberTraining


def add_mile_args(p) -> None:
    """`rtllm mile` = the `rtllm sample` options (sampler mclmc) plus the members' training."""
    d = MemberTraining.__dataclass_fields__
    a = p.add_argument
    a("--members", type=int, required=True, help="ensemble members K, one MCLMC chain each (MILE: 12)")
    a("--member-lr", type=float, default=d["lr"].default, help="AdamW learning rate of the members (%(default)s)")
    a("--member-steps", type=int, default=d["max_steps"].default, help="most AdamW steps per member (%(default)s)")
    a("--member-eval-every", type=int, default=d["eval_every"].default, help="steps between held-out "
      "evaluations for early stopping (%(default)s)")
    a("--patience", type=int, default=d["patience"].default, help="evaluations without improvement "
      "before a member stops (%(default)s)")
    a("--member-batch-size", type=int, default=d["batch_size"].default, help="sequences per AdamW step (%(default)s)")
    a("--from-scratch", action="store_true", help="train members from a fresh random init (small networks)")
    # MCLMC with the paper's tuning schedule (docs/sampling.md); --sampler ray: multi-start ray tracing
    p.set_defaults(sampler="mclmc", mclmc_target=None)


def cmd_mile(args) -> int:
    from rtllm.cli.sample import config_from_args
    from rtllm.run.mile import MileConfig, run_mile

    if args.mclmc_target is None:
        args.mclmc_target = "mile" if args.sampler == "mclmc" else "unbiased"
    if args.chain is not None:
        raise ValueError("rtllm mile numbers its chains by member: drop --chain")
    training = MemberTraining(lr=args.member_lr, max_steps=args.member_steps, eval_every=args.member_eval_every,
                              patience=args.patience, batch_size=args.member_batch_size,
                              from_scratch=args.from_scratch)
    run_mile(MileConfig(members=args.members, sampling=config_from_args(args), training=training),
             resume=args.resume, overwrite=args.overwrite)
    return 0
