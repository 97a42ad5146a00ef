"""Help texts (issue 16, item 9): a description atop every subcommand's --help, one style for
defaults, `evaluate --out` lists what it writes, `demo --steps` says its number."""
import argparse

import pytest

from rtllm.cli import build_parser
from rtllm.cli.demo import DEMO_STEPS

PARSER = build_parser()
COMMANDS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


def help_text(parser, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: no wrapping to search across
    return parser.format_help()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_a_description(name, monkeypatch):
    lines = help_text(COMMANDS[name], monkeypatch).splitlines()
    description = lines[lines.index("") + 1]  # usage, a blank line, the description
    assert description and not description.startswith(("options", "positional")), lines[:4]


def option_help(parser, option):
    """The help of one option as --help prints it (defaults filled in), unwrapped."""
    action = next(a for a in parser._actions if option in a.option_strings)
    return parser._get_formatter()._expand_help(action)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_defaults_have_one_style(name, monkeypatch):
    parser = COMMANDS[name]
    assert "(default " not in help_text(parser, monkeypatch)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = option_help(parser, action.option_strings[0])
        assert "%(" not in text and "(default " not in text, text
        if action.default is not None and action.default is not False and action.default != []:
            assert "default: " in text, f"{action.option_strings[0]}: {text}"


def test_evaluate_out_lists_everything_it_writes():
    from rtllm.evaluation.publish import MARKER, OUTPUT_NAMES

    line = option_help(COMMANDS["evaluate"], "--out")
    for name in (*OUTPUT_NAMES, MARKER):
        assert name in line, name


def test_demo_steps_says_its_number():
    line = option_help(COMMANDS["demo"], "--steps")
    assert f"(default: {DEMO_STEPS})" in line


def test_activation_checkpointing_is_explained_in_plain_words():
    for name in ("sample", "plan"):
        line = option_help(COMMANDS[name], "--activation-checkpoint-every")
        assert "recompute" in line and "backward" in line and "block" in line, line
