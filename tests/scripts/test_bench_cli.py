"""scripts/bench_cli.py: it times every subcommand's --help, and one run of it works."""
import sys

from repo_paths import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_cli  # noqa: E402


def test_every_subcommand_is_timed():
    names = {c[0] for c in bench_cli.commands() if c}
    assert {"sample", "mile", "merge", "pretrain", "evaluate", "plan", "demo"} <= names
    assert [] in bench_cli.commands()  # `rtllm --help` itself


def test_one_help_is_timed_in_a_fresh_process():
    (seconds,) = bench_cli.time_help(["plan"], repeats=1)
    assert 0 < seconds < 60  # generous: the figure that matters is in docs/benchmarks.md
