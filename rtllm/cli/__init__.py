"""The `rtllm` command: argparse only. Each subcommand's options and its `cmd_*` live in a module
of this room (sample, mile, evaluate, plan, pretrain); the command calls a function of the room
that does the work (rtllm.run, rtllm.evaluation, rtllm.plan, rtllm.lm). Building the parser
imports nothing heavy; each command imports what it needs when it runs.

May import: every other room. Nothing outside the CLI imports it.
"""
from __future__ import annotations

import argparse
import sys

from rtllm.cli.evaluate import add_evaluate_args, cmd_evaluate
from rtllm.cli.fiber import add_fiber_args, cmd_fiber
from rtllm.cli.mile import add_mile_args, cmd_mile
from rtllm.cli.plan import add_plan_args, cmd_plan
from rtllm.cli.pretrain import cmd_demo, cmd_pretrain
from rtllm.cli.sample import add_sample_args, cmd_merge, cmd_sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtllm", description="Posterior samples of language-model "
                                     "weights with the ray tracing sampler.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="sample the weights of a Hugging Face checkpoint")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("mile", help="MILE: train K ensemble members, sample each with tuned MCLMC, merge")
    add_sample_args(p)
    add_mile_args(p)
    p.set_defaults(func=cmd_mile)
    p = sub.add_parser("fiber", help="walk particles along the fiber of a trained model, fit a map, write ensembles")
    add_fiber_args(p)
    p.set_defaults(func=cmd_fiber)
    p = sub.add_parser("merge", help="list the samples of every chain in DIR/chains in DIR/ensemble.json")
    p.add_argument("dir", help="the --out of a multi-chain run (torchrun ... rtllm sample, or --chain K)")
    p.add_argument("--require-all", action="store_true", help="refuse unless every chain has finished")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the sample files")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("pretrain", help="train the tiny built-in GPT-2 (no download)")
    p.add_argument("--out", required=True, help="directory for the model and tokenizer")
    p.add_argument("--text", nargs="+", help="training text files (default: the bundled corpus)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("evaluate", help="token-level predictive uncertainty of an ensemble")
    add_evaluate_args(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("plan", help="memory plan of a sampling run: bytes per component, and whether it fits")
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("demo", help="pretrain (or reuse) the tiny model, sample it, export and evaluate")
    p.add_argument("--out", default="rtllm-demo", help="working directory (%(default)s)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the demo's own)")
    p.add_argument("--overwrite", action="store_true", help="re-run the sampling even if it exists")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar and messages say what happens
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        # One line that says what is wrong and what to do; the traceback helps nobody here.
        print(f"rtllm {args.command}: error: {err}", file=sys.stderr)
        return 2

