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
from rtllm.cli.export import add_export_args, cmd_export
from rtllm.cli.fiber import add_fiber_args, cmd_fiber
from rtllm.cli.generate import add_generate_args, cmd_generate
from rtllm.cli.mile import add_mile_args, cmd_mile
from rtllm.cli.plan import add_plan_args, cmd_plan
from rtllm.cli.demo import DEMO_STEPS
from rtllm.cli.pretrain import cmd_demo, cmd_pretrain
from rtllm.cli.sample import add_sample_args, cmd_merge, cmd_sample


class DefaultsFormatter(argparse.HelpFormatter):
    """One style for defaults: an option that has a value unless given ends its help with
    "(default: X)"; the texts may write "(%(default)s)" for short, or say the default in words
    ("default: the model's context")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("(%(default)s)", "(default: %(default)s)")
        text = text.replace("(%(default)s:", "(default: %(default)s,")
        if ("%(default)" not in text and "default" not in text and action.option_strings
                and action.default is not None and action.default is not False
                and action.default not in ([], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtllm", description="Posterior samples of language-model "
                                     "weights with the ray tracing sampler.",
                                     formatter_class=DefaultsFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, func, *add_args) -> argparse.ArgumentParser:
        """Register a subcommand: its options (the add_*_args given) and the cmd_* it runs."""
        # The one-line help of the command list is also the description atop its own --help.
        p = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                formatter_class=DefaultsFormatter)
        for add in add_args:
            add(p)
        p.set_defaults(func=func)
        return p

    command("sample", "sample the weights of a Hugging Face checkpoint", cmd_sample, add_sample_args)
    command("mile", "MILE: train K ensemble members, sample each with tuned MCLMC, merge", cmd_mile,
            add_sample_args, add_mile_args)
    command("fiber", "walk particles along the fiber of a trained model, fit a map, write ensembles",
            cmd_fiber, add_fiber_args)
    p = command("merge", "list the samples of every chain in DIR/chains in DIR/ensemble.json", cmd_merge)
    p.add_argument("dir", help="the --out of a multi-chain run (torchrun ... rtllm sample, or --chain K)")
    p.add_argument("--require-all", action="store_true", help="refuse unless every chain has finished")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the sample files")
    p = command("pretrain", "train the tiny built-in GPT-2 (no download)", cmd_pretrain)
    p.add_argument("--out", required=True, help="directory for the model and tokenizer")
    p.add_argument("--text", nargs="+", help="training text files (default: the bundled corpus)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    command("evaluate", "token-level predictive uncertainty of an ensemble", cmd_evaluate, add_evaluate_args)
    command("generate", "continue a prompt with the ensemble, colored by epistemic uncertainty", cmd_generate,
            add_generate_args)
    command("export", "expand an ensemble (any sample format) into from_pretrained directories", cmd_export,
            add_export_args)
    command("plan", "memory plan of a sampling run: bytes per component, and whether it fits", cmd_plan,
            add_plan_args)
    p = command("demo", "pretrain (or reuse) the tiny model, sample it, export and evaluate", cmd_demo)
    p.add_argument("--out", default="rtllm-demo", help="working directory (%(default)s)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="sampler steps, burn-in included (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="re-run the sampling even if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from rtllm.run.signals import Interrupted, Stopped, exit_code, interrupt_on_signals, resume_command

    hf_logging.disable_progress_bar()  # our own progress bar and messages say what happens
    argv = sys.argv[1:] if argv is None else list(argv)
    args.argv = argv  # for messages that quote the command (sample --shard-state)
    resumable = args.command in ("sample", "mile")
    try:
        with interrupt_on_signals():
            return args.func(args)
    except Stopped as stop:  # SIGINT/SIGTERM in the sampling loop: stopped at a safe point
        print(f"rtllm {args.command}: {stop}; continue with: {resume_command(argv)}", file=sys.stderr)
        return exit_code(stop.signum)
    except Interrupted as stop:  # elsewhere: nothing half-written is ever listed as complete
        then = f"; continue with: {resume_command(argv)}" if resumable else "; run it again"
        print(f"rtllm {args.command}: interrupted by {stop}{then}", file=sys.stderr)
        return exit_code(stop.signum)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        # One line that says what is wrong and what to do; the traceback helps nobody here.
        print(f"rtllm {args.command}: error: {err}", file=sys.stderr)
        return 2

