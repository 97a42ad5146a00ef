"""Meta-device models materialized straight into the flat buffers, and the memory bounds that
GPT-2 1.5B on a 24 GB machine depends on (noise cache capped over all shards, slice-wise update)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from repo_paths import SCRIPTS
import rtllm
import rtllm.state.backends as backends
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import config_initializer, meta_model, prepare_for_sampling

N_LAYER = 2
# n_embd 64: the smallest random tensor (c_proj, 64 x 64) has 4096 elements, so a sample std is
# within 1/sqrt(2*4096) = 1.1% (one sigma) of the true one.
CONFIG = dict(n_embd=64, n_layer=N_LAYER, n_head=2, vocab_size=384, n_positions=64,
              bos_token_id=0, eos_token_id=0)


def _config() -> GPT2Config:
    return GPT2Config(**CONFIG)


def _meta_sampler(seed: int = 0, dtype: torch.dtype | None = None, **kwargs):
    torch.manual_seed(seed)
    model = prepare_for_sampling(meta_model(_config(), dtype=dtype), checkpointing=False)
    sampler = rtllm.RayTracer(model.parameters(), dt=1e-3, seed=0, ray="model", device="cpu",
                              init_weights=config_initializer(model), **kwargs)
    return model, sampler


def _expected_std(name: str) -> float | None:
    """GPT-2's init: N(0, 0.02), c_proj scaled by 1/sqrt(2 n_layer); None for ones/zeros."""
    if name.endswith(".bias") or ".ln_" in name:
        return None
    return 0.02 / math.sqrt(2 * N_LAYER) if "c_proj.weight" in name else 0.02


def test_meta_init_matches_a_normally_built_model():
    torch.manual_seed(1)
    normal = GPT2LMHeadModel(_config())
    model, sampler = _meta_sampler(seed=2)
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(normal.named_parameters(remove_duplicate=False))
    assert list(ours) == list(theirs)
    assert {k: p.shape for k, p in ours.items()} == {k: p.shape for k, p in theirs.items()}
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    (shard,) = sampler.shards
    x_lo, x_hi = shard.x.data_ptr(), shard.x.data_ptr() + shard.x.numel() * 4
    for name, p in ours.items():
        assert p.device.type == "cpu" and x_lo <= p.data_ptr() < x_hi, name  # a view of x
        assert p.grad is not None and p.grad.data_ptr() != p.data_ptr()
        q = theirs[name]
        std = _expected_std(name)
        if std is None:  # LayerNorm weights are ones, every bias and LayerNorm bias zero
            assert torch.equal(p, q), name
            assert torch.all(p == (1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                                   or name.endswith("ln_f.weight") else 0.0)), name
            continue
        n = p.numel()
        # 5 sigma each: sample std relative error 1/sqrt(2n); the ratio of two such, sqrt(2) x.
        assert abs(p.std().item() / std - 1) < 5 / math.sqrt(2 * n), name
        assert abs(p.std().item() / q.std().item() - 1) < 5 / math.sqrt(n), name
        assert abs(p.mean().item()) < 5 * std / math.sqrt(n), name
        assert not torch.equal(p, q)  # a random init of its own, not a copy


def test_meta_built_sampler_steps_like_one_built_from_the_same_weights():
    model, sampler = _meta_sampler()
    twin = prepare_for_sampling(GPT2LMHeadModel(_config()), checkpointing=False)
    twin.load_state_dict(model.state_dict())
    twin_sampler = rtllm.RayTracer(twin.parameters(), dt=1e-3, seed=0, ray="model")
    ids = torch.randint(CONFIG["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for m, s in ((model, sampler), (twin, twin_sampler)):
            s.zero_grad()
            lm_loss(m, ids[:, :-1], ids[:, 1:]).backward()
            s.step()
    for a, b in zip(sampler.shards, twin_sampler.shards, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.v, b.v)
    assert sampler.ln_luminosity == twin_sampler.ln_luminosity
    assert torch.equal(model.transformer.wte.weight, twin.transformer.wte.weight)


def test_low_precision_meta_model_keeps_an_unrounded_fp32_position():
    model, sampler = _meta_sampler(dtype=torch.bfloat16)
    (shard,) = sampler.shards
    assert shard.compute is not None and shard.compute.dtype == torch.bfloat16
    # The init wrote fp32 x directly: its values are not all bf16-representable.
    assert not torch.equal(shard.x, shard.x.to(torch.bfloat16).float())
    assert torch.equal(shard.compute, shard.x.to(torch.bfloat16))
    for i, p in enumerate(model.parameters()):
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
        assert p.data_ptr() == sampler._flat[0].view("compute", i).data_ptr()
    ids = torch.randint(CONFIG["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
    assert shard.g.abs().sum() > 0  # autograd accumulated into the buffer
    sampler.step()
    assert torch.equal(shard.compute, shard.x.to(torch.bfloat16))


def test_meta_parameters_need_a_device_and_an_initializer():
    with torch.device("meta"):
        lin = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="meta device.*device="):
        rtllm.RayTracer(lin.parameters(), dt=0.1, init_weights=lambda: None)
    with pytest.raises(ValueError, match="init_weights="):
        rtllm.RayTracer(lin.parameters(), dt=0.1, device="cpu")
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        rtllm.RayTracer(lin.parameters(), dt=0.1, device="meta", init_weights=lambda: None)
    # An initializer that misses a parameter: named by index and shape (it is still NaN).
    with pytest.raises(ValueError, match=r"parameter 1 of the group \(shape \(3,\)\).*never wrote"):
        rtllm.RayTracer(lin.parameters(), dt=0.1, device="cpu",
                        init_weights=lambda: lin.weight.normal_())
    real = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="init_weights="):
        rtllm.RayTracer(real.parameters(), dt=0.1, init_weights=lambda: None)
    with pytest.raises(ValueError, match="meta parameters only"):
        rtllm.RayTracer(real.parameters(), dt=0.1, device="meta")


def test_meta_model_rejects_non_causal_configs_and_models_with_buffers():
    from transformers import BertConfig, T5Config

    with pytest.raises(ValueError, match="pass the config of a causal LM"):
        meta_model(T5Config(num_layers=1, d_model=8, num_heads=2, d_kv=4, d_ff=8))
    # BERT's causal-LM head keeps position ids in buffers, which the meta device cannot hold.
    with pytest.raises(ValueError, match="has buffers .*position_ids.*from_pretrained"):
        meta_model(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                              intermediate_size=8, is_decoder=True))


def _stack(sizes: list[int]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]


@pytest.mark.parametrize("cache_max, update_slice", [(0, 10_007), (150_000, 2**22)])
def test_noise_cache_is_capped_over_all_shards_and_steps_do_not_change(
        monkeypatch, cache_max, update_slice):
    # 3 shards of <= 100k elements (99001, 95536, 5000); shard and parameter boundaries fall
    # inside 2^16-element noise chunks, and (first case) inside update slices.
    sizes = [70_001, 29_000, 65_536, 30_000, 5_000]

    def run() -> tuple[list[torch.Tensor], int]:
        params = _stack(sizes)
        sampler = rtllm.RayTracer(params, dt=1e-2, ray="model", backend="torch",
                                  max_shard_elements=100_000)
        assert len(sampler.shards) == 3
        for step in range(3):
            for i, p in enumerate(params):
                p.grad.copy_(torch.sin(p.detach() * (i + 1) + step))
            sampler.step()
        return [s.x.clone() for s in sampler.shards] + [s.v.clone() for s in sampler.shards], \
            sampler.backend._noise_elements

    reference, held = run()
    assert held == sum(sizes)  # default cap: every shard cached
    monkeypatch.setattr(backends, "NOISE_CACHE_MAX", cache_max)
    monkeypatch.setattr(backends, "UPDATE_SLICE", update_slice)
    capped, held = run()
    assert held <= cache_max
    assert (held > 0) == (cache_max > 0)
    for a, b in zip(reference, capped, strict=True):
        assert torch.equal(a, b)  # cached or redrawn, in any slicing: the same noise


def _load_bench_scale():
    path = SCRIPTS / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scale_runs_end_to_end_on_a_tiny_config(tmp_path, capsys):
    _config().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "scale.json"
    result = _load_bench_scale().main(["--model", str(tmp_path / "tiny"), "--steps", "2",
                                       "--seq-len", "16", "--batch", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    n = sum(p.numel() for p in GPT2LMHeadModel(_config()).parameters())
    assert result["params"] == n and result["buffer_bytes"] == 12 * n  # fp32 x, v, g
    # Random init: the loss of a near-uniform prediction, ln(vocab) = 5.95, within 0.5 nats.
    assert all(abs(loss - math.log(CONFIG["vocab_size"])) < 0.5 for loss in result["losses"])
    assert result["skipped_steps"] == 0 and result["tokens_per_s"] > 0
    assert result["peak_bytes"] >= result["baseline_rss_bytes"] > 0
    assert "| step 2 sampler |" in capsys.readouterr().out
