"""`accelerate launch` as a second launcher for independent chains (it starts torchrun's ranks
and sets RANK / WORLD_SIZE / LOCAL_RANK, which rtllm.run.chains.Launch reads)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from rtllm.run.merge import INDEX_STRIDE
from rtllm.store.ensemble import Ensemble

RUN_ARGS = ["--steps", "12", "--burn-in", "4", "--thin", "4", "--dt", "2e-3", "--batch-size", "4",
            "--seq-len", "16", "--seed", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_chains_under_accelerate_launch(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "ens"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    # --multi_gpu picks accelerate's torchrun launcher; the ranks find no GPU and run on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "rtllm.cli", "sample", "--model", str(tiny_model_dir),
           "--train", str(train_file), "--out", str(out), *RUN_ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ens = Ensemble(out)  # the last rank to finish merged both chains
    assert ens.chains == [0, 1] and ens.indices == [0, 1, INDEX_STRIDE, INDEX_STRIDE + 1]
    assert [c["status"] for c in ens.config["chains"]] == ["finished", "finished"]
