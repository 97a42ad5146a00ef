"""`rtllm sample --shard-state` under torchrun (gloo, CPU): one chain over W ranks writes the same
sample files as one process taking the ranks' parts as micro-batches, and stays within rounding
of the plain whole-batch one-process chain; a rank killed mid-run and `--resume` of all ranks
end at the same sample; a launch with other settings per rank, or another rank count on
resume, stops every rank with one message.

Most of a torchrun launch of the tiny GPT-2 is process start and imports (torch, transformers),
so launches are shared (tests/run/sharded_launcher.py runs several command lines in the same
processes): one W = 2 run serves three tests, the resume of the killed run and the launch with
other settings per rank are one launch, and the W = 3 launch also makes the refused resume.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rtllm.run.checkpoint import checkpoint_path
from rtllm.cli import main as cli_main
from rtllm.store.manifest import sha256_file
from rtllm.store.runlog import read_log

LAUNCHER = Path(__file__).parent / "sharded_launcher.py"
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")

RUN = ["--steps", "12", "--burn-in", "4", "--thin", "4", "--dt", "2e-3", "--batch-size", "6",
       "--seq-len", "16", "--log-every", "4", "--checkpoint-every", "4", "--seed", "1",
       "--shard-state"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _alone(args: list[str]) -> None:
    """`rtllm sample` on this process (outside any torchrun variables this process may have)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in RANK_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setenv("HF_HUB_OFFLINE", "1")
        # the ranks run at OMP_NUM_THREADS=1 (_env), and CPU chains are byte-reproducible only at
        # one thread count: so does this one, whatever the module-scoped fixtures' caller set
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert cli_main(["sample", *args]) == 0
        finally:
            torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(world: int, script: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _why(text: str) -> str:
    """The lines of a failed launch's output that say why (torchrun's own summary says little)."""
    lines = text.splitlines()
    return "\n".join(l for l in lines if "rror" in l and "errors.html" not in l)[-4000:]


def _hashes(out: Path) -> dict[str, str]:
    return {p.parent.name: sha256_file(p) for p in sorted((out / "samples").glob("*/model.safetensors"))}


def _args(model_dir, train_file, out) -> list[str]:
    return ["--model", str(model_dir), "--train", str(train_file), "--out", str(out), *RUN]


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, train_file, tmp_path_factory, one_thread):
    """The one-process chain taking the 2 ranks' parts as micro-batches, and two W = 2 launches:
    (A) the same chain over 2 ranks, then a run whose rank 1 is SIGKILLed after its first
    checkpoint; (B) the resume of that run on all ranks, then a run whose ranks get other seeds."""
    base = tmp_path_factory.mktemp("two_ranks")
    alone, sharded, killed, broken = (base / name for name in ("alone", "sharded", "killed", "broken"))
    _alone([*_args(tiny_model_dir, train_file, alone), "--micro-batch", "3"])
    output = base / "launch-a.txt"
    with open(output, "w") as sink:
        agent = subprocess.Popen(_launch_cmd(2, [["sample", *_args(tiny_model_dir, train_file, sharded)],
                                                 ["sample", *_args(tiny_model_dir, train_file, killed)]]),
                                 env=_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
        rank1_ckpt = checkpoint_path(killed / "ranks" / "rank-01", 0)
        deadline = time.monotonic() + 300
        while not rank1_ckpt.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = _rank_pid(agent.pid, 1)
        alive = pid is not None and agent.poll() is None
        if alive:
            os.kill(pid, signal.SIGKILL)
        code = agent.wait(timeout=120)
    first = SimpleNamespace(text=output.read_text(), alive=alive, code=code, killed_hashes=_hashes(killed))
    second = _launch(2, [["sample", *_args(tiny_model_dir, train_file, killed), "--resume"],
                         # each rank appends its own --seed ({RANK}): other settings per rank
                         ["sample", *_args(tiny_model_dir, train_file, broken), "--seed", "{RANK}"]])
    return SimpleNamespace(alone=alone, sharded=sharded, killed=killed, broken=broken, first=first,
                           second=second)


def _launch_cmd(world: int, runs: list[list[str]]) -> list[str]:
    """Several command lines in one torchrun launch (tests/run/sharded_launcher.py)."""
    return _torchrun_cmd(world, [str(LAUNCHER), json.dumps(runs)])


def _launch(world: int, runs: list[list[str]]) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(world, runs), env=_env(), capture_output=True, text=True,
                          timeout=300)


def _exit_codes(text: str) -> dict[str, list[int]]:
    """{rank: the exit code of each command line that ended} as the launcher printed them."""
    codes: dict[str, list[int]] = {}
    for rank, code in re.findall(r"rank (\d+): command \d+ exit code (-?\d+)", text):
        codes.setdefault(rank, []).append(int(code))
    return codes


def test_sharded_run_writes_the_one_process_samples(two_ranks):
    alone, sharded, text = two_ranks.alone, two_ranks.sharded, two_ranks.first.text
    codes = _exit_codes(text)
    assert codes.get("0", [None])[0] == 0 and codes.get("1", [None])[0] == 0, _why(text)
    assert len(_hashes(alone)) == 2 and _hashes(sharded) == _hashes(alone)
    assert (sharded / "checkpoints").is_dir() and (sharded / "ranks" / "rank-01" / "checkpoints").is_dir()
    assert not (sharded / "ranks" / "rank-01" / "samples").exists() or \
        not any((sharded / "ranks" / "rank-01" / "samples").iterdir())  # rank 0 writes the samples
    # one line names the one-process command it equals (the command of the `alone` run)
    said = [line for line in text.splitlines() if f"--out {sharded} " in line
            and "bit for bit the chain of one process running `rtllm sample" in line]
    assert len(said) == 1 and said[0].endswith("--shard-state --micro-batch 3` (docs/sharding.md)")


def _samples(out: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(p) for p in sorted((out / "samples").glob("*/model.safetensors"))]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "log-chain-000.jsonl") if r.get("type") == "step"]


def test_sharded_chain_is_the_whole_batch_chain_up_to_rounding(two_ranks, tiny_model_dir, train_file,
                                                                tmp_path, one_thread):
    """No data-parallel chain can equal the one-process whole-batch chain bit for bit (a batch's
    gradient summed over other parts rounds otherwise, and the plain chain's sums are fp32
    partial dots): they differ at rounding level, which 12 steps leave below 1e-5 (docs/sharding.md)."""
    plain = tmp_path / "plain"  # one process, the whole batch in one backward, fast sums
    _alone(_args(tiny_model_dir, train_file, plain)[:-1])  # RUN without --shard-state
    assert _hashes(plain) != _hashes(two_ranks.sharded)  # not the same bits (else this is moot)
    from safetensors.torch import load_file

    start = load_file(tiny_model_dir / "model.safetensors")
    for a, b in zip(_samples(two_ranks.sharded), _samples(plain), strict=True):
        assert a.keys() == b.keys()
        x = torch.cat([a[n].float().flatten() for n in sorted(a)])
        diff = x - torch.cat([b[n].float().flatten() for n in sorted(a)])
        moved = x - torch.cat([start[n].float().flatten() for n in sorted(a)])
        # all positions: largest difference vs largest weight, and in norm (measured 8e-7, 4e-7)
        assert float(diff.abs().max() / x.abs().max()) < 1e-5
        assert float(diff.norm() / x.norm()) < 1e-5
        assert float(moved.norm() / x.norm()) > 1e-3  # the chains moved: not the start's bits
        for name in a:  # per tensor; biases that start at 0 are small (measured <= 6.3e-6)
            worst = (a[name].float() - b[name].float()).abs().max() / a[name].float().abs().max()
            assert float(worst) < 1e-4, f"{name}: relative difference {float(worst):.2e}"
    sharded_losses, plain_losses = _losses(two_ranks.sharded), _losses(plain)
    assert len(sharded_losses) == len(plain_losses) == 12
    for s, p in zip(sharded_losses, plain_losses):
        assert math.isclose(s, p, rel_tol=1e-5), (s, p)


def test_three_ranks_write_the_one_process_samples_and_refuse_a_two_rank_resume(
        two_ranks, tiny_model_dir, train_file, tmp_path, one_thread):
    alone = tmp_path / "alone"
    _alone([*_args(tiny_model_dir, train_file, alone), "--micro-batch", "2"])
    sharded, two = tmp_path / "sharded", tmp_path / "two-rank-run"
    shutil.copytree(two_ranks.sharded, two)
    before = {p: p.stat().st_mtime_ns for p in two.rglob("*")}
    done = _launch(3, [["sample", *_args(tiny_model_dir, train_file, sharded)],
                       ["sample", *_args(tiny_model_dir, train_file, two), "--resume"]])
    text = done.stdout + done.stderr
    assert done.returncode == 0, _why(text)
    assert _exit_codes(done.stdout) == {"0": [0, 2], "1": [0, 2], "2": [0, 2]}, text[-3000:]
    assert len(_hashes(alone)) == 2 and _hashes(sharded) == _hashes(alone)
    # another rank count on resume: refused by every rank, with one message, nothing touched
    assert text.count("chain over 2 rank(s), this launch has 3") == 3, text[-3000:]
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*")} == before


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


def test_a_killed_rank_and_resume_end_at_the_same_sample(two_ranks):
    whole = two_ranks.alone  # the uninterrupted chain: one process, the 2 ranks' parts in turn
    first, second = two_ranks.first, two_ranks.second
    assert first.alive, "the run ended before a rank could be killed"
    assert first.code != 0  # torchrun stops the group
    assert len(first.killed_hashes) < 2  # killed before its last sample
    assert second.returncode == 0, _why(second.stdout + second.stderr)
    assert _exit_codes(second.stdout) == {"0": [0, 2], "1": [0, 2]}, (second.stdout + second.stderr)[-3000:]
    assert _hashes(two_ranks.killed) == _hashes(whole)


def test_ranks_started_with_different_settings_all_stop(two_ranks):
    done = two_ranks.second  # its second command line: rank r appended --seed r
    text = done.stdout + done.stderr
    assert _exit_codes(done.stdout) == {"0": [0, 2], "1": [0, 2]}, text[-3000:]
    assert text.count("rtllm sample: error: rank 1 was started with other settings than rank 0 "
                      "(seed: 1 vs 0)") == 2, text[-3000:]
    assert not two_ranks.broken.exists()


@pytest.mark.parametrize("extra, message", [
    (["--layout", "fp32-split"], "--shard-state does not support --layout fp32-split yet"),
    (["--params", "h\\.0"], "--shard-state does not support --params yet"),
    (["--chain", "2"], "--shard-state runs one chain over all ranks in --out; drop --chain"),
    (["--sampler", "mclmc", "--L", "0.5", "--prior-scale", "1", "--burn-in", "4"],
     "--shard-state does not support --prior-scale with --sampler mclmc yet"),
])
def test_options_it_cannot_shard_fail_with_one_line(extra, message, tiny_model_dir, train_file,
                                                    tmp_path, capsys):
    assert cli_main(["sample", *_args(tiny_model_dir, train_file, tmp_path / "o"), *extra]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
