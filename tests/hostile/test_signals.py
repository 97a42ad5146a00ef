"""SIGINT and SIGTERM: the run stops at a safe point, prints one line with the resume command and
exits 130 / 143; resuming from there gives the samples of an uninterrupted run, byte for byte.
Subprocesses (about 10 s each on the 2-core machine): a signal needs a process of its own."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from refusal import sample_argv
from rtllm.cli import main as cli_main
from rtllm.store.ensemble import Ensemble

LONG_RUN = ["--steps", "400", "--burn-in", "4", "--thin", "2"]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rtllm.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    log = out / "log-chain-000.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"type": "step"') >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {n}: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_safe_point_with_the_resume_command(tiny_model_dir, train_file, tmp_path,
                                                                 signum, code, capsys, one_thread):
    # one_thread: the stopped run ran with OMP_NUM_THREADS=1, and a CPU chain is byte-reproducible
    # at the same thread count only (LayerNorm's backward sums per thread), so the runs below too.
    out = tmp_path / "run"
    argv = sample_argv(tiny_model_dir, train_file, out) + LONG_RUN
    proc = _start(argv)
    _wait_for_steps(out, 6, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    # Off a terminal the loop reports progress every ~10 s ("sampling: 8/400 steps ..."): the
    # stop itself is one line, the last.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sampling: ")]
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"stopped by {signal.Signals(signum).name} at step" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert shlex.split(command) == ["rtllm", *argv, "--resume"]
    assert (out / "checkpoints" / "chain-000.safetensors").is_file()
    assert not (out / ".rtllm.lock").exists()  # released on the way out
    if signum != signal.SIGINT:
        return
    # Resume the stopped run, shortened to a few steps past the stop (the step count is not
    # chain-defining), and compare with an uninterrupted run of that length.
    step = json.loads([r for r in (out / "log-chain-000.jsonl").read_text().splitlines()
                       if '"checkpoint"' in r][-1])["step"]
    short = ["--steps", str(max(12, step + 4))]
    assert cli_main(shlex.split(command)[1:] + short) == 0
    assert cli_main(sample_argv(tiny_model_dir, train_file, tmp_path / "whole") + LONG_RUN + short) == 0
    a, b = Ensemble(tmp_path / "whole"), Ensemble(out)
    assert [e["sha256"] for e in a.entries] == [e["sha256"] for e in b.entries] and len(a) >= 4
