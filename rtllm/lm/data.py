"""Training text as packed token sequences, a held-out split, and a resumable minibatch order.

Sequence convention (shared with `rtllm.lm.loss`): a sequence of context length T is stored as
T + 1 tokens; the model reads `seq[:, :-1]` and is scored on predicting `seq[:, 1:]`
(`inputs_and_targets` splits them). Consecutive sequences overlap by one token
(row i = stream[i*T : i*T + T + 1]), so every next-token transition of the stream is scored
exactly once and no target is lost at the sequence boundaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

# Bytes read to decide whether a file found in a directory is text (no NUL byte in them).
_SNIFF_BYTES = 8192


def read_texts(paths: Iterable[str | Path], encoding: str | None = None) -> list[tuple[Path, str]]:
    """Read text files, recursing into directories; returns `[(path, text), ...]`.

    Inside a directory every non-hidden file whose first 8 KiB hold no NUL byte counts as text
    (so .txt, .md, extension-less files, ...); files are taken in sorted path order. A named
    file holding a NUL byte is binary and refused. Text is decoded strictly: as UTF-8, or as
    `encoding` when given; a file that does not decode is refused (never silently replaced).
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ValueError(f"text path {path} does not exist; pass text files or directories")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not _hidden(p.relative_to(path)) and _is_text(p))
            if not found:
                raise ValueError(f"directory {path} holds no text files; pass a directory of "
                                 f"text files (or the files themselves)")
            files.extend(found)
        else:
            files.append(path)
    seen: set[Path] = set()
    texts = []
    for path in files:
        key = path.resolve()
        if key not in seen:  # a file named twice (directly and via its directory) counts once
            seen.add(key)
            texts.append((path, decode_text(path, encoding)))
    if not texts:
        raise ValueError("no text paths given; pass at least one text file or directory")
    return texts


def decode_text(path: Path, encoding: str | None = None) -> str:
    """The text of `path`; a one-line ValueError for a binary file or bytes that do not decode."""
    data = path.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{path} is a binary file (it holds NUL bytes), not text; pass text files")
    name = encoding or "utf-8"
    try:
        return data.decode(name)
    except LookupError:
        raise ValueError(f"--encoding {name!r} is not an encoding Python knows; pass e.g. "
                         f"utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as err:
        hint = ("pass --encoding with the file's encoding (e.g. latin-1) or convert it to UTF-8"
                if encoding is None else "pass the file's real encoding with --encoding")
        raise ValueError(f"{path} is not valid {name} (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); {hint}") from None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_text(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def context_length(model_or_config) -> int:
    """The model's maximum context length (n_positions / max_position_embeddings / n_ctx)."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(config).__name__} names no context length (n_positions or "
                     f"max_position_embeddings); pass seq_len explicitly")


def tokenize_texts(texts: Sequence[tuple[Path, str]], tokenizer) -> tuple[Tensor, list[int]]:
    """One token stream for all documents, joined with the eos token between them.

    Returns `(stream, counts)`: a 1-D LongTensor and the number of tokens of each document.
    """
    eos = tokenizer.eos_token_id
    if eos is None and len(texts) > 1:
        raise ValueError("the tokenizer has no eos token to separate documents; set "
                         "tokenizer.eos_token (e.g. '<|endoftext|>') or pass a single file")
    pieces, counts = [], []
    for i, (_, text) in enumerate(texts):
        # verbose=False: the stream is longer than model_max_length by design (we pack it).
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        counts.append(len(ids))
        if i > 0:
            pieces.append([eos])
        pieces.append(ids)
    stream = torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)
    return stream, counts


def split_heldout(stream: Tensor, heldout: Tensor | None = None, *, fraction: float = 0.05
                  ) -> tuple[Tensor, Tensor]:
    """`(train_stream, heldout_stream)`.

    With `heldout` (the stream of separate held-out files) the training stream is kept whole;
    otherwise the last `fraction` of the stream (at least one token) is held out and removed
    from training.
    """
    if heldout is not None:
        return stream, heldout
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout fraction must be in (0, 1), got {fraction!r}")
    cut = len(stream) - max(1, math.ceil(fraction * len(stream)))
    return stream[:cut], stream[cut:]


def pack(stream: Tensor, seq_len: int, *, what: str = "the text") -> Tensor:
    """Cut a 1-D token stream into `[(len - 1) // seq_len, seq_len + 1]` sequences.

    Row i is stream[i*seq_len : i*seq_len + seq_len + 1]; the tail that does not fill a row is
    dropped. `what` names the text in the error when it is shorter than one sequence.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{what} has {len(stream)} tokens, fewer than one sequence of "
                         f"seq_len + 1 = {seq_len + 1}; pass more text or a smaller seq_len")
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


def inputs_and_targets(sequences: Tensor) -> tuple[Tensor, Tensor]:
    """`(input_ids, targets)` of packed sequences `[B, T + 1]`: each `[B, T]`."""
    return sequences[:, :-1], sequences[:, 1:]


@dataclass(frozen=True)
class TokenData:
    """Packed training and held-out sequences, `[N, seq_len + 1]` LongTensors (see the module
    docstring for the convention)."""

    train: Tensor
    heldout: Tensor
    seq_len: int

    @property
    def heldout_seq_len(self) -> int:
        return self.heldout.shape[1] - 1

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[tuple[Path, str]], *,
                   heldout: Sequence[tuple[Path, str]] | None = None, seq_len: int | None = None,
                   context: int | None = None, heldout_fraction: float = 0.05) -> "TokenData":
        """Tokenize, split and pack `read_texts` output.

        `heldout`: separate held-out texts; without them the last `heldout_fraction` of the
        training stream is held out (and not trained on). `seq_len`: the sequence length,
        used as given (a text shorter than one sequence is an error); without it the model's
        `context` length capped by the training text, so a short text still gives one
        sequence. Held-out sequences use `seq_len` capped by the held-out text.
        """
        if seq_len is None and context is None:
            raise ValueError("give seq_len or the model's context length (rtllm.lm.data.context_length)")
        if seq_len is not None and context is not None and not 1 <= seq_len <= context:
            raise ValueError(f"seq_len must be in [1, {context}] (the model's context length), "
                             f"got {seq_len}")
        stream, counts = tokenize_texts(texts, tokenizer)
        held_stream = held_counts = None
        if heldout:
            held_stream, held_counts = tokenize_texts(heldout, tokenizer)
        train, held = split_heldout(stream, held_stream, fraction=heldout_fraction)

        what = "the training text (" + _describe(texts, counts) + (
            ")" if heldout else f"; {len(train)} tokens after holding out the last "
                                f"{heldout_fraction:.0%})")
        length = seq_len if seq_len is not None else max(1, min(context, len(train) - 1))
        train_seqs = pack(train, length, what=what)
        held_what = ("the held-out text (" + _describe(heldout, held_counts) + ")" if heldout
                     else f"the held-out tail ({len(held)} tokens, {heldout_fraction:.0%} of the text)")
        held_seqs = pack(held, max(1, min(length, len(held) - 1)), what=held_what)
        return cls(train=train_seqs, heldout=held_seqs, seq_len=length)


def _describe(texts: Sequence[tuple[Path, str]], counts: Sequence[int], limit: int = 5) -> str:
    parts = [f"{path}: {count} tokens" for (path, _), count in zip(texts, counts)]
    if len(parts) > limit:
        parts = parts[:limit] + [f"... {len(parts) - limit} more files, {sum(counts)} tokens in all"]
    return ", ".join(parts)


class MinibatchOrder:
    """A seeded order of minibatches over epochs, as a pure function of a cursor.

    Epoch e visits the sequences in a permutation drawn from a generator seeded by (seed, e);
    the cursor counts the batches drawn so far, so a resumed run that restores the cursor
    continues the same order. Each epoch has `n_sequences // batch_size` full batches (equal
    batch sizes keep the likelihood scale constant); the `n_sequences % batch_size` sequences
    at the end of each epoch's permutation sit that epoch out - different ones each epoch.
    """

    def __init__(self, n_sequences: int, batch_size: int, seed: int) -> None:
        for name, value in (("n_sequences", n_sequences), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if batch_size > n_sequences:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_sequences} sequences of the "
                             f"data; pass a smaller batch size, more text or a shorter seq_len")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n_sequences = n_sequences
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = n_sequences // batch_size
        self._cached: tuple[int, Tensor] | None = None

    def permutation(self, epoch: int) -> Tensor:
        """The order of the sequences in `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._cached = (epoch, torch.from_numpy(rng.permutation(self.n_sequences)).long())
        return self._cached[1]

    def epoch_of(self, cursor: int) -> int:
        return cursor // self.batches_per_epoch

    def batch(self, cursor: int) -> Tensor:
        """Sequence indices (LongTensor [batch_size]) of batch number `cursor` (0-based)."""
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"cursor must be a non-negative int, got {cursor!r}")
        epoch, k = divmod(cursor, self.batches_per_epoch)
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size].clone()
