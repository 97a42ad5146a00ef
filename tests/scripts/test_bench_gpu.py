"""scripts/bench_gpu.py in --smoke mode on CPU (every path but the CUDA-only calls), and the
selective-checkpointing option it measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from repo_paths import SCRIPTS
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import prepare_for_sampling

SCRIPT = SCRIPTS / "bench_gpu.py"


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke test is the CPU stand-in")
def test_smoke_runs_every_section_and_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--json", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"smoke", "machine", "kernels", "model", "offload", "syncs", "targets"}
    assert result["smoke"] is True
    assert set(result["section_s"]) == {"kernels", "model", "offload", "syncs"}

    k = result["kernels"]
    assert k["numel"] == 4096 and k["copy_GBps"] > 0 and k["floor_ms"] > 0
    assert 0 < k["reduce_frac_of_copy"] and 0 < k["update_frac_of_copy"] and k["two_pass_over_floor"] > 0

    m = result["model"]
    assert m["params"] > 0 and m["sampler_over_floor"] > 0
    # batches 1 and 2, each with checkpointing on every block and off
    assert [(r["batch"], r["checkpoint_every"]) for r in m["rows"]] == [(1, 1), (2, 1), (1, 0), (2, 0)]
    for r in m["rows"]:
        assert "error" not in r
        assert r["fwd_bwd_tokens_per_s"] > r["tokens_per_s"] > 0
        assert 0 < r["sampler_share"] < 1
        assert r["peak_allocated"] is None and r["peak_reserved"] is None  # CUDA-only statistics
        assert r["planned_total"] >= r["planned_peak_allocated"] > 0  # rtllm.plan.memory's prediction
    assert m["limited_rows"] == [] and "CUDA" in m["limit_note"]

    o = result["offload"]
    assert o["sample_bytes"] > 4 * m["params"]  # fp32 on CPU, plus the header
    assert o["window_base_s"] > 0 and o["window_offload_s"] > 0 and o["write_tail_s"] >= 0
    assert result["syncs"] == {"undo_copy": {"undo_copy": True, "syncs_per_step": None}}

    assert set(result["targets"]) == {"kernel_frac_of_copy", "two_pass_over_floor",
                                      "offload_over_step", "peak_gib_8x1024"}
    assert result["targets"]["peak_gib_8x1024"]["value"] is None  # no 8 x 1024 in smoke mode
    assert "| target | value | limit | met |" in proc.stdout
    assert not list(tmp_path.glob("tmp*")), "the offloaded sample's directory must be removed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_without_a_gpu_only_smoke_runs(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before any work
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2
    assert "only --smoke runs" in capsys.readouterr().err.strip().splitlines()[-1]


def _tiny(checkpoint_every: int, checkpointing: bool = True):
    config = GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=97, n_positions=32)
    torch.manual_seed(0)
    return prepare_for_sampling(GPT2LMHeadModel(config), checkpointing=checkpointing,
                                checkpoint_every=checkpoint_every)


def test_checkpoint_every_k_thins_checkpointing_without_changing_gradients():
    flags = lambda model: [block.gradient_checkpointing for block in model.transformer.h]  # noqa: E731
    assert flags(_tiny(1)) == [True] * 4
    assert flags(_tiny(2)) == [True, False, True, False]
    assert flags(_tiny(3)) == [True, False, False, True]
    ids = torch.randint(97, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (_tiny(1), _tiny(2), _tiny(1, checkpointing=False)):
        lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # Recomputation replays the same fp32 ops: equal up to a few ulps of reordering.
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)
    # Re-preparing with k = 1 switches every block back on.
    model = _tiny(2)
    assert flags(prepare_for_sampling(model)) == [True] * 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_checkpoint_every_rejects_non_positive_ints(bad):
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
        _tiny(bad)
