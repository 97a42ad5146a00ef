"""`rtllm sample` picks the largest micro-batch that fits (accelerate's find_executable_batch_size).

A minibatch's gradient is accumulated over micro-batches of `state["micro_batch"]` sequences
(None: the whole minibatch in one piece). When a forward or backward runs out of memory
(`rtllm.lm.out_of_memory`), the micro-batch goes down to the largest divisor of the batch size
at most half of it, and the *same* minibatch is computed again from zeroed gradients: nothing
of the failed attempt remains, so the chain is the one a run started with `--micro-batch` at
the smaller size takes from that gradient on. The size in use is part of the run's state,
kept in its checkpoints, so a resumed run continues with the size the run had reached.

Why not accelerate's decorator itself: it retries a whole function and forgets the size when the
function returns; here the size must outlive the call (every later step, and the checkpoint) and
stay a divisor of the batch size (each micro-batch's loss is weighted by its share of the batch).
"""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import Tensor

from rtllm.lm.out_of_memory import is_out_of_memory, release_memory

T = TypeVar("T")


def smaller_micro_batch(batch_size: int, micro: int) -> int | None:
    """The largest divisor of `batch_size` that is at most micro // 2; None when micro is 1."""
    return next((d for d in range(micro // 2, 0, -1) if batch_size % d == 0), None)


def backing_off(work: Callable[[int], T], state: dict, batch_size: int,
                on_back_off: Callable[[list[int], int], None]) -> T:
    """work(micro) at the micro-batch in use; on an out-of-memory error, again at a smaller
    one (kept in `state["micro_batch"]`) until it fits, then on_back_off(sizes that did not
    fit, size that did) once. Out of memory at one sequence: a RuntimeError saying what to do."""
    failed: list[int] = []
    while True:
        micro = state.get("micro_batch") or batch_size
        try:
            result = work(micro)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            smaller = smaller_micro_batch(batch_size, micro)
            if smaller is None:
                raise RuntimeError(
                    "out of memory with a micro-batch of 1 sequence: nothing smaller to try; use a "
                    "shorter --seq-len, --activation-checkpoint-every 1, a leaner --layout, or a "
                    "device with more memory (`rtllm plan` shows what fits)") from None
        else:
            if failed:
                on_back_off(failed, micro)
            return result
        # outside the except block: the traceback no longer holds the failed attempt's tensors
        release_memory()
        failed.append(micro)
        state["micro_batch"] = smaller


def whole_or_pieces(loss: Callable[[Tensor], Tensor], seqs: Tensor, state: dict,
                    on_back_off: Callable[[int, int], None]) -> Tensor:
    """loss(seqs) in one call (a forward without gradients: its value must not depend on the
    micro-batch); only if that runs out of memory, the share-weighted float64 sum of loss over
    pieces of the micro-batch in use, backing off as `backing_off` does."""
    try:
        return loss(seqs)
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
    release_memory()
    return backing_off(lambda micro: sum(loss(p).double() * (len(p) / len(seqs)) for p in seqs.split(micro)),
                       state, len(seqs), on_back_off)
