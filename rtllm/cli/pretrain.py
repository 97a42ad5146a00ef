"""`rtllm pretrain` and `rtllm demo`: the tiny built-in GPT-2, and the whole pipeline on it."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rtllm.lm.pretrain import pretrain

    kwargs = {} if args.steps is None else {"steps": args.steps}
    pretrain(Path(args.out), [Path(t) for t in args.text] if args.text else None, seed=args.seed,
             overwrite=args.overwrite, **kwargs)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rtllm.cli.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, overwrite=args.overwrite)
    return 0
