"""rtllm sample backs off to the largest micro-batch that fits, and resumes at it byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Model

from rtllm.run.checkpoint import checkpoint_path, load_checkpoint
from rtllm.run.config import SampleConfig
from rtllm.run.micro_batch import backing_off, smaller_micro_batch
from rtllm.run.sampling import SamplingRun
from rtllm.store.ensemble import Ensemble
from rtllm.store.runlog import read_log

pytestmark = pytest.mark.usefixtures("one_thread")
FITS = 2  # sequences per forward+backward that the simulated device holds


def oom(n):
    # the message torch gives (torch.cuda.OutOfMemoryError: a RuntimeError in every allowed torch)
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} GiB (simulated)")


def test_smaller_micro_batch_divides_the_batch():
    assert [smaller_micro_batch(8, m) for m in (8, 4, 2, 1)] == [4, 2, 1, None]
    assert smaller_micro_batch(12, 12) == 6 and smaller_micro_batch(12, 6) == 3
    assert smaller_micro_batch(12, 3) == 1 and smaller_micro_batch(9, 9) == 3


def test_backing_off_retries_the_same_work_smaller_and_keeps_the_size(monkeypatch):
    from rtllm.run import micro_batch

    released = []  # the cache is emptied before each smaller try (here: counted, not collected)
    monkeypatch.setattr(micro_batch, "release_memory", lambda: released.append(1))
    state, tried, said = {"micro_batch": None}, [], []

    def work(micro):
        tried.append(micro)
        if micro > 3:
            raise oom(micro)
        return micro * 10

    assert backing_off(work, state, 12, lambda f, m: said.append((f, m))) == 30
    assert tried == [12, 6, 3] and state["micro_batch"] == 3 and said == [([12, 6], 3)]
    assert len(released) == 2
    tried.clear()
    assert backing_off(work, state, 12, lambda f, m: said.append((f, m))) == 30
    assert tried == [3] and len(said) == 1  # the size stays; nothing more to say
    with pytest.raises(RuntimeError, match="micro-batch of 1 sequence"):  # nothing fits
        backing_off(lambda m: (_ for _ in ()).throw(oom(m)), {"micro_batch": 2}, 4, lambda f, m: None)
    with pytest.raises(RuntimeError, match="other"):  # other errors are not taken for OOM
        backing_off(lambda m: (_ for _ in ()).throw(RuntimeError("other")), {}, 4, lambda f, m: None)


class Killed(BaseException):
    """kill -9 stand-in: raised in a forward pass, it ends the run where it stands."""


@pytest.fixture
def device(monkeypatch):
    """A device where a forward+backward of more than FITS sequences runs out of memory.
    Forwards without gradients (held-out loss, probe, guards) fit at any size, as activations
    kept for the backward are what fills a real device."""
    forward, sizes, plan = GPT2Model.forward, [], {"run": None, "kill_at": None}

    def tight(self, input_ids=None, **kw):
        if torch.is_grad_enabled():
            sizes.append(len(input_ids))
            run = plan["run"]
            if plan["kill_at"] is not None and run.state["step"] == plan["kill_at"]:
                raise Killed()
            if len(input_ids) > FITS:
                raise oom(len(input_ids))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(GPT2Model, "forward", tight)
    return sizes, plan


def config(model_dir, train_file, out, **kw) -> SampleConfig:
    return SampleConfig(**{**dict(model=str(model_dir), train=(str(train_file),), out=str(out), steps=14,
                                  burn_in=4, thin=3, dt=2e-3, batch_size=8, seq_len=16, seed=3,
                                  checkpoint_every=5, log_every=50), **kw})


def sample_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "samples").rglob("*"))
            if p.is_file()}


def test_a_run_backs_off_and_equals_one_started_at_that_micro_batch(tiny_model_dir, train_file, tmp_path,
                                                                    device):
    sizes, plan = device
    said: list[str] = []
    plan["run"] = run = SamplingRun(config(tiny_model_dir, train_file, tmp_path / "backed"), log=said.append)
    run.run()
    lines = [m for m in said if "out of memory" in m]
    assert len(lines) == 1 and "micro-batch of 8 sequences" in lines[0] and "backed off to 2" in lines[0]
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # tried whole, then only what fits
    assert [r for r in read_log(tmp_path / "backed" / "log-chain-000.jsonl") if r["type"] == "micro_batch"] \
        == [{"type": "micro_batch", "step": 0, "from": 8, "to": 2}]
    assert load_checkpoint(checkpoint_path(tmp_path / "backed", 0))["state"]["micro_batch"] == 2

    # The same chain as a run given --micro-batch 2: the failed attempts changed nothing (the
    # gradients are zeroed before each attempt, the sampler steps only after one succeeds), so
    # every gradient is the same sum of the same pieces. The sample files are equal byte for
    # byte (weights, and metadata: the manifest config records the micro-batch in use), and so
    # are the manifests' entries (hashes, losses) and config.
    sizes.clear()
    plan["run"] = SamplingRun(config(tiny_model_dir, train_file, tmp_path / "given", micro_batch=FITS))
    plan["run"].run()
    assert set(sizes) == {2}
    backed, given = Ensemble(tmp_path / "backed"), Ensemble(tmp_path / "given")
    assert len(backed) == 3 and sample_bytes(tmp_path / "backed") == sample_bytes(tmp_path / "given")
    assert backed.entries == given.entries and backed.config == given.config
    assert backed.config["micro_batch"] == 2

    # Killed after the back-off (a checkpoint at step 5, one sample on disk, killed in step 8),
    # then resumed with the same options: it continues at micro-batch 2 (no attempt at 8) and
    # writes what the uninterrupted run wrote, byte for byte.
    cfg = config(tiny_model_dir, train_file, tmp_path / "killed")
    plan["run"], plan["kill_at"] = SamplingRun(cfg, log=lambda m: None), 8
    with pytest.raises(Killed):
        plan["run"].run()
    assert load_checkpoint(checkpoint_path(tmp_path / "killed", 0))["state"]["step"] == 5
    assert (tmp_path / "killed" / "samples" / "000000").is_dir()
    sizes.clear()
    said.clear()
    plan["run"], plan["kill_at"] = SamplingRun(cfg, resume=True, log=said.append), None
    plan["run"].run()
    assert set(sizes) == {2} and not any("out of memory" in m for m in said)
    assert sample_bytes(tmp_path / "killed") == sample_bytes(tmp_path / "backed")
    assert Ensemble(tmp_path / "killed").entries == backed.entries
    assert json.loads((tmp_path / "killed" / "ensemble.json").read_text())["config"] == backed.config
