"""Helpers for the hostile-input tests: run the CLI in-process on a bad input and check that it
was refused cleanly (exit != 0, at most two lines on stderr, no traceback) and that nothing on
disk changed (no file written, removed or modified anywhere under the watched folder, which
holds --out and every input)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig

RUN_ARGS = ["--steps", "8", "--burn-in", "4", "--thin", "2", "--dt", "1e-3", "--batch-size", "4",
            "--seq-len", "16", "--seed", "3", "--device", "cpu"]


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under `root`: files by (size, sha256, mode), directories by mode."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            state[str(p.relative_to(root))] = ("dir", p.stat().st_mode)
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if os.access(p, os.R_OK) else None
            state[str(p.relative_to(root))] = ("file", st.st_size, digest, st.st_mode)
    return state


def assert_refused(argv: list[str], watched: Path, capsys, *, match: str | None = None) -> str:
    """Run `rtllm argv` in-process; assert a clean refusal that changed nothing under `watched`.
    Returns stderr."""
    capsys.readouterr()
    before = tree_state(watched)
    try:
        rc = cli_main(argv)
    except SystemExit as exit_:  # argparse refuses bad option values by exiting 2
        rc = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), f"exit code {rc} for {argv}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) <= 2, f"{len(lines)} lines on stderr:\n{err}"
    if match is not None:
        assert match in err, err
    after = tree_state(watched)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}"
    return err


def sample_argv(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model), "--train", str(train), "--out", str(out), *RUN_ARGS, *extra]


def run_config(model: Path, train: Path, out: Path) -> SampleConfig:
    """The SampleConfig RUN_ARGS give (so a CLI --resume of a finished run agrees with it)."""
    return SampleConfig(model=str(model), train=(str(train),), out=str(out), steps=8, burn_in=4,
                        thin=2, dt=1e-3, batch_size=4, seq_len=16, seed=3, device="cpu")
