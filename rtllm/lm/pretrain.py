"""The built-in starting checkpoint: a small GPT-2 pretrained on the bundled plays, on CPU.

Posterior sampling needs a model that already fits its data; downloading one is not allowed in
tests or the demo, so `pretrain` makes one from `rtllm.lm.corpus` in a minute or two and saves it in
the ordinary `save_pretrained` layout (safetensors + tokenizer.json), loadable offline with
`AutoModelForCausalLM` / `AutoTokenizer`.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rtllm.lm.corpus import train_files
from rtllm.state.progress import Progress

EOS = "<|endoftext|>"
INFO_FILE = "rtllm_pretrain.json"  # hyper-parameters and losses, next to config.json
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Every 20th packed sequence, the first included, is validation: ~5%, spread over all texts.
_VAL_EVERY = 20
_EVAL_SEQS = 64  # sequences per loss estimate: 8k tokens, a few seconds of forward passes


def train_bpe_tokenizer(
    texts: list[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on `texts`, with `<|endoftext|>` as bos/eos/unk.

    Byte-level means every string round-trips exactly; the vocabulary may come out smaller than
    `vocab_size` when the text has too few distinct pairs.
    """
    if vocab_size < 257:
        raise ValueError(
            f"vocab_size must exceed the 256 byte symbols plus {EOS}, got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=max_length,
        # The default clean-up rewrites " ," to "," on decode and breaks the round trip.
        clean_up_tokenization_spaces=False,
    )


def _read_texts(paths: list[Path]) -> list[str]:
    if not paths:
        raise ValueError("no training texts given")
    texts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"training text {path} does not exist or is not a file")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"training text {path} is empty")
        texts.append(text)
    return texts


def _pack(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], paths: list[Path], seq_len: int
) -> torch.Tensor:
    """All texts as one token stream (eos between them), cut into [n, seq_len] sequences."""
    stream: list[int] = []
    # The backend directly: the wrapper warns about every text longer than model_max_length.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += enc.ids + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n < 2:  # one to train on, one to validate on
        raise ValueError(
            f"training texts {[str(p) for p in paths]} give {len(stream)} tokens, too short for "
            f"two sequences of seq_len={seq_len} (one train, one validation): need {2 * seq_len}"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def _mean_loss(model: GPT2LMHeadModel, seqs: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss in nats, dropout off, over up to _EVAL_SEQS evenly spaced sequences.

    Every sequence has the same number of targets, so batch means weight by batch length.
    """
    pick = torch.linspace(0, len(seqs) - 1, min(len(seqs), _EVAL_SEQS)).round().long()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in seqs[pick].split(batch_size):
        total += model(batch, labels=batch).loss.item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / count


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak rate."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    return factor


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh seeded permutation per epoch, the ragged tail dropped."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded global RNG (model init, dropout) and deterministic kernels, restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {out_dir} exists and is not empty; pass overwrite=True to replace it"
        )


def sibling_path(out_dir: Path, tag: str) -> Path:
    """A fresh hidden name next to `out_dir`: same filesystem, so renames are atomic."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory into place; an old one is moved aside first, then removed."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = sibling_path(out_dir, "old")
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def _train(
    model: GPT2LMHeadModel,
    train: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    show_progress: bool,
) -> None:
    """AdamW with warm-up + cosine decay and gradient clipping, over seeded shuffled batches."""
    # Weight decay on matrices only, as usual: decaying gains and biases just hurts the fit.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    batches = _batches(len(train), batch_size, torch.Generator().manual_seed(seed))
    model.train()
    every = max(1, steps // 100)  # reading the loss syncs: not every step
    with Progress(steps, "pretrain", enabled=show_progress) as bar:
        for step, idx in zip(range(steps), batches):
            batch = train[idx]
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1, **({"batch_loss": f"{loss.item():.3f}"} if step % every == 0 else {}))


def _save(
    out_dir: Path,
    overwrite: bool,
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    info: dict,
) -> None:
    """Write everything into a hidden sibling, then rename it to `out_dir`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_path(out_dir, "tmp")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would survive the rename
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared while we trained
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrain(
    out_dir: str | Path,
    texts: list[Path] | None = None,
    *,
    steps: int = 600,
    vocab_size: int = 2048,
    seq_len: int = 128,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    batch_size: int = 8,
    lr: float = 2e-3,
    activation: str = "gelu_pytorch_tanh",
    attention_dropout: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train a byte-level BPE tokenizer and a small GPT-2 on `texts`; save both to `out_dir`.

    `texts` defaults to `rtllm.lm.corpus.train_files()`. The result is built in a temporary sibling
    directory and renamed into place, so `out_dir` is either absent or complete. Losses (nats
    per token, dropout off) go to `log` and to `rtllm_pretrain.json` in `out_dir`.
    Deterministic for a given seed on a given machine and thread count. `activation`: GPT-2's tanh
    GELU as torch's fused kernel (the same function as GPT-2's "gelu_new", which transformers spells
    out in five elementwise ops): forward+backward 20-30% faster on CPU. `attention_dropout`:
    GPT-2's is 0.1; at 0 (the embedding and residual dropout stay 0.1) torch's fused attention
    runs and there are no attention masks to draw: a step ~20% faster on CPU.
    """
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    sizes = {"steps": steps, "seq_len": seq_len, "n_layer": n_layer, "batch_size": batch_size}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    _check_out_dir(out_dir, overwrite)
    paths = [Path(p) for p in (train_files() if texts is None else texts)]
    raw = _read_texts(paths)

    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(raw, vocab_size, max_length=seq_len)
    seqs = _pack(tokenizer, raw, paths, seq_len)
    is_val = torch.arange(len(seqs)) % _VAL_EVERY == 0
    train, val = seqs[~is_val], seqs[is_val]
    say(f"pretrain: {len(tokenizer)} tokens in vocabulary, {seqs.numel()} training tokens "
        f"({len(train)} train / {len(val)} validation sequences of {seq_len})")

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        activation_function=activation, attn_pdrop=attention_dropout,
    )
    with _deterministic(seed):
        model = GPT2LMHeadModel(config)
        # transformers >= 5 picks the loss from the class name, which for GPT2LMHeadModel names none,
        # and warns before taking the causal-LM loss anyway: name it (the same loss, no warning).
        model.loss_type = "ForCausalLM"
        n_params = sum(p.numel() for p in model.parameters())
        initial_val = _mean_loss(model, val, batch_size)
        say(f"pretrain: {n_params / 1e6:.2f}M parameters, "
            f"initial validation loss {initial_val:.3f}")
        _train(model, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
               show_progress=log is not None)
        train_loss = _mean_loss(model, train, batch_size)
        val_loss = _mean_loss(model, val, batch_size)
    seconds = time.perf_counter() - start
    say(f"pretrain: final loss (nats/token) train {train_loss:.3f}, "
        f"validation {val_loss:.3f}; {seconds:.0f} s")

    info = {
        "texts": [p.name for p in paths], "steps": steps, "vocab_size": len(tokenizer),
        "seq_len": seq_len, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
        "batch_size": batch_size, "lr": lr, "activation": activation, "seed": seed, "n_params": n_params,
        "initial_val_loss": initial_val, "train_loss": train_loss, "val_loss": val_loss,
        "seconds": seconds,
    }
    _save(out_dir, overwrite, model, tokenizer, info)
    return out_dir


def is_complete(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a saved model and tokenizer (the files `pretrain` writes)."""
    return all((Path(model_dir) / name).is_file() for name in _REQUIRED_FILES)


def ensure_pretrained(cache_dir: str | Path, **kwargs) -> Path:
    """`cache_dir` if it already holds a complete checkpoint, else `pretrain(cache_dir, **kwargs)`.

    The keyword arguments only matter when training happens; an existing checkpoint is reused
    as it is. If another process finishes the same directory first, its result is used.
    """
    cache_dir = Path(cache_dir)
    if is_complete(cache_dir):
        return cache_dir
    if cache_dir.is_dir() and any(cache_dir.iterdir()):
        raise ValueError(
            f"{cache_dir} is not empty but lacks some of {list(_REQUIRED_FILES)}; "
            "remove it to retrain"
        )
    try:
        return pretrain(cache_dir, **kwargs)
    except (ValueError, OSError):
        if is_complete(cache_dir):  # a concurrent run won the rename
            return cache_dir
        raise
