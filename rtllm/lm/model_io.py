"""Load a local Hugging Face causal LM, make it deterministic for sampling, choose what to sample.

Nothing is ever downloaded: every load is `local_files_only=True`, and a path that is not a
complete local model directory is rejected with a one-line error saying what to do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

# Files that carry a vocabulary. transformers 5 builds an *empty* tokenizer (one special token)
# when a directory has none of them, instead of failing, so we check before loading.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_RAY_PER = ("model", "group", "tensor")


def _dtype_kwarg() -> str:
    # from_pretrained's `torch_dtype` became `dtype` in transformers 4.56 (the old name warns).
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model_and_tokenizer(model_dir: str | Path, *, dtype: torch.dtype | None = None,
                             device: str | torch.device = "cpu"):
    """Load `(model, tokenizer)` from a local Hugging Face causal-LM directory.

    `dtype=None` keeps the dtype stored in the checkpoint (float32 when it names none).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist; pass a local Hugging Face model "
                         f"directory (models are never downloaded)")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; pass the directory that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json); pass a "
                         f"directory written by save_pretrained")
    _check_readable(path / "config.json")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"cannot read {path / 'config.json'} ({_first_line(err)}); pass a directory "
                         f"written by save_pretrained") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path} holds a {type(config).__name__} (model_type "
                         f"{config.model_type!r}), which is not a causal LM; pass a causal-LM "
                         f"directory (e.g. GPT-2, Llama)")
    check_safetensors_weights(path)  # before the tokenizer: the weights are the likelier problem
    tokenizer = load_tokenizer(path, f"tokenizer.save_pretrained({str(path)!r})")
    model = load_weights(AutoModelForCausalLM, path, dtype)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's "
                         f"embedding has {rows} rows: the tokenizer does not belong to these "
                         f"weights; save the model's own tokenizer there")
    return model.to(device), tokenizer


def load_weights(auto_class, path: Path, dtype: torch.dtype | None = None):
    """`auto_class.from_pretrained(path)` from safetensors only, refusing any weight mismatch.

    transformers would quietly initialise every weight the files lack (a config with more layers,
    another model type) at random; here a missing, unexpected or mis-shaped tensor is an error
    naming it. Pickle weights (pytorch_model.bin) are never loaded: unpickling can run code.
    """
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    check_safetensors_weights(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, at length, what we raise
    try:
        model, info = auto_class.from_pretrained(
            path, local_files_only=True, use_safetensors=True, output_loading_info=True,
            **{_dtype_kwarg(): dtype if dtype is not None else "auto"})
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        if "mismatched_sizes" in str(err):  # transformers refuses shapes that differ from config
            raise ValueError(f"config.json in {path} does not match its weights: tensor shapes "
                             f"differ from what it describes; pass the directory save_pretrained "
                             f"wrote, config and weights together") from None
        raise ValueError(f"cannot load the weights in {path} ({_first_line(err)}); the directory "
                         f"needs complete model.safetensors files from save_pretrained") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for kind, remedy in (("missing_keys", "the files lack them"),
                         ("unexpected_keys", "the model has no place for them"),
                         ("mismatched_keys", "their shapes differ from config.json")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise ValueError(f"config.json in {path} does not match its weights: {len(names)} "
                             f"{kind.replace('_keys', '')} tensor(s) ({shown}; {remedy}); pass the "
                             f"directory save_pretrained wrote, config and weights together")
    return model


def check_safetensors_weights(path: Path) -> None:
    """A one-line ValueError unless `path` holds readable safetensors weights."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickles[:2])}), which rtllm never "
                f"loads (unpickling can run code); convert them once, in a place you trust: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes "
                f"model.safetensors")
        raise ValueError(f"cannot load the weights in {path}: it holds no model.safetensors; "
                         f"pass a directory written by save_pretrained")
    for f in [path / "config.json", *files]:
        _check_readable(f)


def _check_readable(f: Path) -> None:
    # Otherwise transformers reports an unreadable file as "No such file or directory".
    if not os.access(f, os.R_OK):
        raise ValueError(f"{f} is not readable (permission denied); fix its permissions "
                         f"(chmod u+r) or copy the model to a directory you can read")


def load_tokenizer(path: Path, remedy: str):
    """The tokenizer saved in `path`, or a one-line ValueError ending with how to put one there.

    Checked by hand: with no tokenizer files transformers quietly builds an empty tokenizer.
    """
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
                         f"save one into it with {remedy}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ValueError(f"cannot load the tokenizer in {path} ({_first_line(err)}); save a "
                         f"working one there with {remedy}") from err
    if not tokenizer("a b c", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"the tokenizer in {path} has an empty vocabulary; save a working one "
                         f"there with {remedy}")
    return tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def prepare_for_sampling(model: nn.Module, *, checkpointing: bool = True,
                         checkpoint_every: int = 1) -> nn.Module:
    """Make the forward pass a deterministic function of the weights; returns `model`.

    Dropout would make ln p random beyond the minibatch, so every dropout rate is set to 0. The
    model stays in train mode nevertheless: Hugging Face activation checkpointing only runs in
    train mode, and with zero dropout train and eval forwards agree. The KV cache is turned off
    (it is useless without generation and conflicts with checkpointing). `checkpoint_every=k`
    checkpoints only every k-th block (0, k, 2k, ...): the others keep their activations, which
    saves their recomputed forward at the cost of their activation memory (docs/benchmarks.md).
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1 (1: every block), got {checkpoint_every!r}")
    for module in model.modules():
        # _DropoutNd is the common base of Dropout, Dropout1d/2d/3d, AlphaDropout, ...
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        # Some attention modules copy the rate into a float at init (Llama's attention_dropout)
        # and pass it to the attention kernel directly, bypassing any nn.Dropout.
        for key, value in list(vars(module).items()):
            if _is_dropout_name(key) and isinstance(value, float):
                setattr(module, key, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if _is_dropout_name(key) and isinstance(value, float):
                setattr(config, key, 0.0)
        config.use_cache = False
    model.train()
    if checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        # transformers 5 renamed the switch (the old name warns); accept both.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if checkpoint_every > 1:
            _checkpoint_every_kth_block(model, checkpoint_every)
    elif not checkpointing and _is_checkpointing(model):
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
    return model


def _checkpoint_every_kth_block(model: nn.Module, k: int) -> None:
    # Recent transformers checkpoint per block (GradientCheckpointingLayer reads its own flag at
    # call time); older versions switch the whole model, which cannot be thinned.
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = None
    blocks = [m for m in model.modules()
              if GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no per-block checkpointing switch (this "
                         f"transformers has no GradientCheckpointingLayer); use checkpoint_every=1")
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i % k == 0


def _is_checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _is_dropout_name(key: str) -> bool:
    return key.endswith("pdrop") or "dropout" in key


def select_parameters(model: nn.Module, pattern: str | None
                      ) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """Split the parameters into sampled ones (`re.search(pattern, name)`) and frozen ones.

    `pattern=None` samples everything. Frozen parameters get `requires_grad=False`, sampled ones
    `True`. A tied parameter (GPT-2's lm_head.weight is transformer.wte.weight) appears once,
    under its first name, and is sampled if the pattern matches any of its names.
    Returns `(sampled, frozen_names)`.
    """
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except re.error as err:
        raise ValueError(f"--params {pattern!r} is not a valid regular expression ({err})") from err
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    sampled, frozen = [], []
    for name, param in model.named_parameters():
        take = regex is None or any(regex.search(n) for n in aliases[id(param)])
        param.requires_grad_(take)
        if take:
            sampled.append((name, param))
        else:
            frozen.append(name)
    if not sampled:
        names = [name for name, _ in model.named_parameters()]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(f"--params {pattern!r} matches no parameter; names look like: {shown}")
    return sampled, frozen


# A path component that is an integer is the index of a block in a ModuleList
# (transformer.h.3., model.layers.3.).
_LAYER_INDEX = re.compile(r"^(.*?\.\d+)\.")


def group_key(name: str) -> str:
    """The 'group' a parameter belongs to, for one ray per group.

    Rule: the name up to and including the first integer component (`transformer.h.3`,
    `model.layers.3`) - one group per transformer block; a name without one (embeddings, final
    norm, untied LM head) is grouped by its owning module (`transformer.wte`, `model.norm`).
    """
    match = _LAYER_INDEX.match(name)
    if match:
        return match.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def param_groups_for(named_params: list[tuple[str, nn.Parameter]], ray_per: str) -> list[dict]:
    """Optimizer parameter groups `{"params": [...], "names": [...]}` for one ray per `ray_per`.

    'model': one group (build the sampler with ray='model'); 'group': one per `group_key`
    (transformer block, embedding, final norm), in order of first appearance; 'tensor': one per
    parameter tensor.
    """
    if ray_per not in _RAY_PER:
        raise ValueError(f"ray_per must be one of {', '.join(_RAY_PER)}, got {ray_per!r}")
    named_params = list(named_params)
    if not named_params:
        raise ValueError("no parameters to group; select at least one parameter to sample")
    if ray_per == "model":
        keys = ["model"] * len(named_params)
    elif ray_per == "tensor":
        keys = [name for name, _ in named_params]
    else:
        keys = [group_key(name) for name, _ in named_params]
    groups: dict[str, dict] = {}
    for key, (name, param) in zip(keys, named_params):
        group = groups.setdefault(key, {"params": [], "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' is CUDA when a GPU is visible, else CPU; asking for an absent GPU is an error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def meta_model(config, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of a transformers `config` on the meta device: every parameter's shape, no
    memory, no values (GPT-2 1.5B builds in seconds).

    Give its parameters to a sampler with `device=` and `init_weights=config_initializer(model)`:
    they are materialized straight into the sampler's flat buffers. `dtype` sets the compute
    dtype (the sampler's position stays fp32). Models with buffers (e.g. rotary frequency
    tables) are rejected: their values would be lost on the meta device.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"cannot build a causal LM from a {type(config).__name__} "
                         f"({_first_line(err)}); pass the config of a causal LM (e.g. GPT-2)") from err
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(f"{type(model).__name__} has buffers ({', '.join(buffers[:3])}"
                         f"{', ...' if len(buffers) > 3 else ''}) that the meta device cannot "
                         f"hold values for; load it with from_pretrained instead")
    return model.to(dtype) if dtype is not None else model


def config_initializer(model: nn.Module):
    """A callable running the model's own random init from its config, in place.

    It is transformers' `initialize_weights` (for GPT-2: N(0, initializer_range) weights, c_proj
    scaled by 1/sqrt(2 n_layer), LayerNorm ones and zeros, zero biases), after clearing the
    `_is_hf_initialized` marks with which transformers skips modules it considers done. Draws
    from torch's global generator: seed it (torch.manual_seed) for a reproducible init.
    """
    def initialize() -> None:
        for obj in (*model.modules(), *model.parameters()):
            obj.__dict__.pop("_is_hf_initialized", None)
        init = getattr(model, "initialize_weights", None)
        if init is not None:
            init()
        else:  # older transformers versions have no initialize_weights
            model.apply(model._init_weights)

    return initialize
