"""Independent chains: two torchrun ranks (gloo, CPU), merge, evaluate; reproducing a chain
alone; settings mismatches across ranks and across chains; a crashed chain; seeds; launch env."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rtllm.run.chains import Launch, run_sample
from rtllm.run.config import chain_seed
from rtllm.run.merge import CHAIN_STATUS, INDEX_STRIDE, chain_dir, merge
from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.evaluation.diagnostics import diagnose
from rtllm.store.ensemble import Ensemble
from rtllm.store.manifest import sha256_file
from rtllm.run.sampling import SamplingRun
from tiny_gpt2 import corpus_text

# 12 steps, burn-in 4, thin 4: samples after steps 8 and 12; probes every 2 steps give 4
# post-burn-in points per chain, the least split R-hat accepts.
RUN_ARGS = ["--steps", "12", "--burn-in", "4", "--thin", "4", "--dt", "2e-3", "--batch-size", "4",
            "--seq-len", "16", "--log-every", "2", "--checkpoint-every", "4", "--seed", "1"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """The in-process runs are plain runs, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def config(model_dir, train_file, out, **kw) -> SampleConfig:
    base = dict(model=str(model_dir), train=(str(train_file),), out=str(out), steps=12, burn_in=4,
                thin=4, dt=2e-3, batch_size=4, seq_len=16, log_every=2, checkpoint_every=4, seed=1)
    base.update(kw)
    return SampleConfig(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def sample_hashes(cdir: Path) -> dict[str, str]:
    return {p.parent.name: sha256_file(p) for p in sorted((cdir / "samples").glob("*/model.safetensors"))}


def test_two_torchrun_ranks_merge_evaluate_and_reproduce_alone(tiny_model_dir, train_file, tmp_path,
                                                               capsys):
    out = tmp_path / "ens"
    done = torchrun(["-m", "rtllm.cli", "sample", "--model", str(tiny_model_dir), "--train",
                     str(train_file), "--out", str(out), *RUN_ARGS])
    assert done.returncode == 0, done.stdout + done.stderr
    assert cli_main(["merge", str(out)]) == 0  # verifies every hash; rewrites the same manifest
    assert "merged 4 samples of 2 chain(s)" in capsys.readouterr().out

    ens = Ensemble(out)
    assert ens.chains == [0, 1] and len(ens) == 4
    assert ens.indices == [0, 1, INDEX_STRIDE, INDEX_STRIDE + 1]
    assert [(e["chain"], e["chain_index"], e["step"]) for e in ens.entries] == [
        (0, 0, 8), (0, 1, 12), (1, 0, 8), (1, 1, 12)]
    assert all(e["path"].startswith(f"chains/chain-00{e['chain']}/samples/") for e in ens.entries)
    assert [c["status"] for c in ens.config["chains"]] == ["finished", "finished"]
    assert ens.config["chains"][1]["chain_seed"] == chain_seed(1, 1) != 1
    # Different seeds, different chains: the first samples differ.
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(ens.state_dict(0)[w], ens.state_dict(INDEX_STRIDE)[w])
    model = ens.load_model(INDEX_STRIDE + 1)  # a complete from_pretrained model
    assert model.config.n_layer == 2

    # evaluate reads the merged directory; its split R-hat compares the 2 chains' logs.
    data = tmp_path / "heldout.txt"
    data.write_text(corpus_text(800, offset=50_000))
    assert cli_main(["evaluate", "--ensemble", str(out), "--data", str(data), "--out",
                     str(tmp_path / "eval"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    diag = json.loads((tmp_path / "eval" / "diagnostics.json").read_text())
    assert summary["n_samples_used"] == 4
    assert diag["n_chains"] == 2 and diag["chains"] == [0, 1] and diag["rhat_max"] is not None
    assert diagnose(out)["n_chains"] == 2

    # Chain 1 alone, outside torchrun, at the ranks' thread count (torchrun sets
    # OMP_NUM_THREADS=1; CPU results depend on the thread count): byte-identical samples.
    threads = torch.get_num_threads()
    torch.set_num_threads(json.loads((chain_dir(out, 1) / CHAIN_STATUS).read_text())["torch_threads"])
    try:
        assert cli_main(["sample", "--model", str(tiny_model_dir), "--train", str(train_file),
                         "--out", str(tmp_path / "alone"), "--chain", "1", *RUN_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    again = sample_hashes(chain_dir(tmp_path / "alone", 1))
    assert len(again) == 2 and again == sample_hashes(chain_dir(out, 1))
    assert again != sample_hashes(chain_dir(out, 0))


def test_ranks_started_with_different_settings_all_stop(tiny_model_dir, train_file, tmp_path):
    launcher = tmp_path / "launcher.py"  # each rank appends its own --seed: a broken launch
    launcher.write_text("import os, sys\nfrom rtllm.cli import main\n"
                        "sys.exit(main(sys.argv[1:] + ['--seed', os.environ['RANK']]))\n")
    out = tmp_path / "ens"
    done = torchrun([str(launcher), "sample", "--model", str(tiny_model_dir), "--train",
                     str(train_file), "--out", str(out), "--steps", "4", "--burn-in", "1"], timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode != 0
    # Both ranks refuse (neither waits for the other), before anything is written.
    assert text.count("rtllm sample: error: rank 1 was started with other settings than rank 0 "
                      "(seed: 1 vs 0)") == 2, text
    assert not out.exists()


def test_merge_takes_a_crashed_chains_complete_samples_then_updates(tiny_model_dir, train_file,
                                                                    tmp_path, monkeypatch, capsys):
    out = tmp_path / "ens"
    run_sample(config(tiny_model_dir, train_file, out), first_chain=0)

    original = SamplingRun._log_probe

    def crash_at_step_8(self, step):
        if step >= 8:
            raise RuntimeError("simulated crash")
        original(self, step)

    monkeypatch.setattr(SamplingRun, "_log_probe", crash_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sample(config(tiny_model_dir, train_file, out), first_chain=1)
    monkeypatch.setattr(SamplingRun, "_log_probe", original)
    c1 = chain_dir(out, 1)
    half = c1 / "samples" / ".tmp-000001-killed"  # what a kill during a sample write leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)

    report = merge(out)
    assert [(c.chain, c.status, c.n_samples) for c in report.chains] == [
        (0, "finished", 2), (1, "running", 1)]  # its process (this one) is alive
    ens = Ensemble(out)
    assert ens.indices == [0, 1, INDEX_STRIDE]
    with pytest.raises(ValueError, match="not every chain has finished.*chain 1: running, 1/2"):
        merge(out, require_all=True)
    capsys.readouterr()
    assert cli_main(["merge", str(out), "--require-all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtllm merge: error: --require-all")

    # A dead process that never finished is reported as stopped; a launch of 3 ranks whose
    # third never started, as missing.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((c1 / CHAIN_STATUS).read_text())
    (c1 / CHAIN_STATUS).write_text(json.dumps({**status, "pid": dead.pid,
                                               "launch": {"chains": [0, 1, 2]}}))
    assert [(c.chain, c.status) for c in merge(out).chains] == [
        (0, "finished"), (1, "stopped"), (2, "missing")]

    # As torchrun restarts a failed group (one rank here, gloo handshake in this process),
    # chain 1 resumes without --resume and finishes; its end-of-run merge updates the ensemble.
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                        ("TORCHELASTIC_RESTART_COUNT", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    run_sample(config(tiny_model_dir, train_file, out), first_chain=1)
    assert "resuming at step 8 of" in capsys.readouterr().out
    assert not half.exists()  # the writer clears temporaries of a crashed run
    ens = Ensemble(out)
    assert ens.indices == [0, 1, INDEX_STRIDE, INDEX_STRIDE + 1]
    assert [c["status"] for c in ens.config["chains"]] == ["finished", "finished"]


def test_merge_refuses_chains_of_another_posterior(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "ens"
    run_sample(config(tiny_model_dir, train_file, out), first_chain=0)
    run_sample(config(tiny_model_dir, train_file, out, batch_size=2), first_chain=2)
    assert "merge skipped (chain 2 was sampled with other settings than chain 0 (batch_size: 2 vs 4)" \
        in capsys.readouterr().out
    with pytest.raises(ValueError, match="chain 2 was sampled with other settings.*batch_size"):
        merge(out)
    shutil.rmtree(chain_dir(out, 2))
    assert merge(out).n_samples == 2

    # Single-chain and multi-chain layouts are never mixed in one directory.
    with pytest.raises(ValueError, match="holds the chains of a multi-chain run; pass --chain K"):
        run_sample(config(tiny_model_dir, train_file, out), resume=True)
    single = tmp_path / "single"
    (single / "samples").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds a single-chain run"):
        run_sample(config(tiny_model_dir, train_file, single), first_chain=0)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge(single)


def test_chain_seed_is_the_documented_pure_function():
    assert chain_seed(7, 0) == 7  # chain 0: a single-chain run is unchanged
    digest = hashlib.sha256(b"rtllm-chain:7:3").digest()
    assert chain_seed(7, 3) == int.from_bytes(digest[:8], "little") >> 1
    seeds = {chain_seed(s, c) for s in range(20) for c in range(20)}
    assert len(seeds) == 400 and max(seeds) < 2**63


def test_launch_from_env():
    assert Launch.from_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert Launch.from_env(env) == Launch(1, 4, 1, 0)
    assert Launch.from_env({**env, "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 2
    with pytest.raises(ValueError, match="RANK=4 is not below WORLD_SIZE=4"):
        Launch.from_env({**env, "RANK": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE=None is not a non-negative integer"):
        Launch.from_env({"RANK": "0"})
