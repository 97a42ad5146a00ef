"""Loading local Hugging Face models, sampling preparation, parameter selection and grouping.

Tiny models and tokenizers are built here in temporary directories (nothing is downloaded);
`tiny_text`, `build_tokenizer` and `save_tiny_model` are reused by test_data.py.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache

import pytest
import torch
from torch import nn

from rtllm.lm.model_io import (group_key, load_model_and_tokenizer, param_groups_for,
                            prepare_for_sampling, select_parameters)

EOS = "<|endoftext|>"
_WORDS = ("the king and queen of a castle in scotland who was said to have seen three witches "
          "upon the heath at night when thunder fell and all the lords came home from war").split()


def tiny_text(n_lines: int, seed: int = 0) -> str:
    """Deterministic word salad: enough structure for a BPE tokenizer to learn merges."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) + "."
                     for _ in range(n_lines))


@lru_cache(maxsize=1)
def build_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) wrapped for transformers, eos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny_text(200)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def tiny_config(arch: str = "gpt2", vocab_size: int = 300, n_positions: int = 32):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=16, n_layer=2,
                          n_head=2, bos_token_id=0, eos_token_id=0)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=n_positions, bos_token_id=0, eos_token_id=0,
                       attention_dropout=0.1)


def save_tiny_model(path, arch: str = "gpt2", *, tokenizer: bool = True, n_positions: int = 32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, n_positions=n_positions)).save_pretrained(path)
    if tokenizer:
        build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"))


# -- loading ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_load_roundtrip(tmp_path, arch):
    save_tiny_model(tmp_path, arch)
    model, tok = load_model_and_tokenizer(tmp_path)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert tok.eos_token == EOS
    ids = tok("the king", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 300)


def test_load_dtype(gpt2_dir):
    model, _ = load_model_and_tokenizer(gpt2_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nope")


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a Hugging Face model directory.*config.json"):
        load_model_and_tokenizer(tmp_path)


def test_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig  # an encoder only (BERT itself has a causal head)

    DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                     hidden_dim=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model_and_tokenizer(tmp_path)


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        load_model_and_tokenizer(tmp_path)


def test_missing_tokenizer(tmp_path):
    # transformers 5 would silently build an empty tokenizer here.
    save_tiny_model(tmp_path, tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer files.*save_pretrained"):
        load_model_and_tokenizer(tmp_path)


def test_missing_weights(tmp_path, gpt2_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    with pytest.raises(ValueError, match="cannot load the weights"):
        load_model_and_tokenizer(tmp_path)


# -- preparation ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prepare_makes_forward_deterministic(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    prepare_for_sampling(model)
    assert model.training and model.config.use_cache is False
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(v == 0 for k, v in vars(model.config).items()
               if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float))
    ids = torch.randint(0, 300, (2, 16))
    train_logits = model(input_ids=ids).logits
    model.eval()
    torch.testing.assert_close(train_logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_prepare_checkpointing_switch():
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(tiny_config())
    prepare_for_sampling(model)
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    prepare_for_sampling(model, checkpointing=False)
    assert not any(block.gradient_checkpointing for block in model.transformer.h)


# -- selection and grouping -------------------------------------------------------------------

def _gpt2():
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(tiny_config())


def test_select_all_once_with_tied_head():
    model = _gpt2()
    sampled, frozen = select_parameters(model, None)
    names = [n for n, _ in sampled]
    assert frozen == [] and "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert len({id(p) for _, p in sampled}) == len(sampled) == len(list(model.parameters()))


def test_select_pattern_freezes_the_rest():
    model = _gpt2()
    sampled, frozen = select_parameters(model, r"h\.1\.mlp")
    assert [n for n, _ in sampled] == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                                       "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n, _ in sampled)
    assert not any(params[n].requires_grad for n in frozen)
    assert len(sampled) + len(frozen) == len(params)


def test_select_tied_alias_matches():
    sampled, _ = select_parameters(_gpt2(), r"^lm_head")
    assert [n for n, _ in sampled] == ["transformer.wte.weight"]


def test_select_nothing_lists_names():
    with pytest.raises(ValueError, match=r"matches no parameter; names look like: transformer\.wte"):
        select_parameters(_gpt2(), "no_such_layer")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_parameters(_gpt2(), "(")


def test_group_key_rule():
    assert group_key("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert group_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert group_key("transformer.wte.weight") == "transformer.wte"
    assert group_key("model.norm.weight") == "model.norm"
    assert group_key("bias") == "bias"


def test_param_groups_for():
    sampled, _ = select_parameters(_gpt2(), None)
    (only,) = param_groups_for(sampled, "model")
    assert only["names"] == [n for n, _ in sampled]
    per_tensor = param_groups_for(sampled, "tensor")
    assert [g["names"] for g in per_tensor] == [[n] for n, _ in sampled]
    groups = param_groups_for(sampled, "group")
    keys = [group_key(g["names"][0]) for g in groups]
    assert keys == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                    "transformer.ln_f"]
    assert sum(len(g["params"]) for g in groups) == len(sampled)
    assert all(len(g["params"]) == len(g["names"]) for g in groups)
    with pytest.raises(ValueError, match="ray_per must be one of"):
        param_groups_for(sampled, "layer")


def test_param_groups_build_a_sampler():
    import rtllm

    sampled, _ = select_parameters(_gpt2(), r"h\.")
    groups = param_groups_for(sampled, "group")
    sampler = rtllm.RayTracer(groups, dt=1e-3)
    assert len(sampler.param_groups) == 2 and sampler.param_groups[0]["names"] == groups[0]["names"]
