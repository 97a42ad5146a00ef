"""`rtllm sample --shard-state` under torchrun (gloo, CPU): one chain over W ranks writes the same
sample files as one process taking the ranks' parts as micro-batches; a rank killed mid-run and
`--resume` of all ranks end at the same sample; a launch with other settings per rank, or another
rank count on resume, stops every rank with one message.

Each torchrun launch of the tiny GPT-2 takes ~20-30 s on the loaded 2-core machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtllm.run.checkpoint import checkpoint_path
from rtllm.cli import main as cli_main
from rtllm.store.manifest import sha256_file

RUN = ["--steps", "12", "--burn-in", "4", "--thin", "4", "--dt", "2e-3", "--batch-size", "6",
       "--seq-len", "16", "--log-every", "4", "--checkpoint-every", "4", "--seed", "1",
       "--shard-state"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(world: int, script: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _sample(world: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(world, ["-m", "rtllm.cli", "sample", *args]), env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _why(done: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (torchrun's own summary says little)."""
    lines = (done.stdout + done.stderr).splitlines()
    return "\n".join(l for l in lines if "rror" in l and "errors.html" not in l)[-4000:]


def _hashes(out: Path) -> dict[str, str]:
    return {p.parent.name: sha256_file(p) for p in sorted((out / "samples").glob("*/model.safetensors"))}


def _args(model_dir, train_file, out) -> list[str]:
    return ["--model", str(model_dir), "--train", str(train_file), "--out", str(out), *RUN]


# W = 3 from the CLI is in the slow set (tests/state/test_sharded.py checks W = 3 in every run).
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_run_writes_the_one_process_samples(world, tiny_model_dir, train_file, tmp_path,
                                                    one_thread):
    alone = tmp_path / "alone"
    assert cli_main(["sample", *_args(tiny_model_dir, train_file, alone),
                     "--micro-batch", str(6 // world)]) == 0
    sharded = tmp_path / "sharded"
    done = _sample(world, _args(tiny_model_dir, train_file, sharded))
    assert done.returncode == 0, _why(done)
    assert len(_hashes(alone)) == 2 and _hashes(sharded) == _hashes(alone)
    assert (sharded / "checkpoints").is_dir() and (sharded / "ranks" / "rank-01" / "checkpoints").is_dir()
    assert not (sharded / "ranks" / "rank-01" / "samples").exists() or \
        not any((sharded / "ranks" / "rank-01" / "samples").iterdir())  # rank 0 writes the samples


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (a child of the agent with RANK=rank in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow  # ~35 s: keeps the suite under 8 minutes (README: the slow set)
def test_a_killed_rank_and_resume_end_at_the_same_sample(tiny_model_dir, train_file, tmp_path,
                                                         one_thread):
    whole = tmp_path / "whole"  # the uninterrupted chain: one process, the 2 ranks' parts in turn
    assert cli_main(["sample", *_args(tiny_model_dir, train_file, whole), "--micro-batch", "3"]) == 0

    out = tmp_path / "killed"
    agent = subprocess.Popen(_torchrun_cmd(2, ["-m", "rtllm.cli", "sample",
                                               *_args(tiny_model_dir, train_file, out)]),
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank1_ckpt = checkpoint_path(out / "ranks" / "rank-01", 0)
    deadline = time.monotonic() + 240
    while not rank1_ckpt.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = _rank_pid(agent.pid, 1)
    assert pid is not None and agent.poll() is None, "the run ended before a rank could be killed"
    os.kill(pid, signal.SIGKILL)
    assert agent.wait(timeout=120) != 0  # torchrun stops the group
    assert len(_hashes(out)) < 2  # killed before its last sample

    resumed = _sample(2, [*_args(tiny_model_dir, train_file, out), "--resume"])
    assert resumed.returncode == 0, _why(resumed)
    assert _hashes(out) == _hashes(whole)

    # another rank count on resume: refused by every rank, with one message
    other = _sample(3, [*_args(tiny_model_dir, train_file, out), "--resume"])
    text = other.stdout + other.stderr
    assert other.returncode != 0
    assert "chain over 2 rank(s), this launch has 3" in text, text[-3000:]


def test_ranks_started_with_different_settings_all_stop(tiny_model_dir, train_file, tmp_path):
    launcher = tmp_path / "launcher.py"  # each rank appends its own --seed: a broken launch
    launcher.write_text("import os, sys\nfrom rtllm.cli import main\n"
                        "sys.exit(main(sys.argv[1:] + ['--seed', os.environ['RANK']]))\n")
    out = tmp_path / "out"
    done = subprocess.run(_torchrun_cmd(2, [str(launcher), "sample",
                                            *_args(tiny_model_dir, train_file, out)]),
                          env=_env(), capture_output=True, text=True, timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode != 0
    assert text.count("rtllm sample: error: rank 1 was started with other settings than rank 0 "
                      "(seed: 1 vs 0)") == 2, text[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--layout", "fp32-split"], "--shard-state does not support --layout fp32-split yet"),
    (["--params", "h\\.0"], "--shard-state does not support --params yet"),
    (["--chain", "2"], "--shard-state runs one chain over all ranks in --out; drop --chain"),
])
def test_options_it_cannot_shard_fail_with_one_line(extra, message, tiny_model_dir, train_file,
                                                    tmp_path, capsys):
    assert cli_main(["sample", *_args(tiny_model_dir, train_file, tmp_path / "o"), *extra]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
