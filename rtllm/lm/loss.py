"""Mean token cross-entropy of a causal LM without materializing the batch's logits.

The LM head and the cross-entropy are fused and chunked over tokens: the forward keeps only
the per-token log-sum-exp (fp32), the backward recomputes each chunk's logits from the last
hidden states. Peak extra memory is one `[chunk_tokens, vocab]` block (plus its fp32 copy
for a low-precision model) instead of `[tokens, vocab]` fp32, which for a 50k vocab and
a few thousand tokens is the largest tensor of the whole step.

Inputs follow `rtllm.lm.data`: `input_ids` and `targets` are the two shifted halves of a packed
sequence (`targets[b, t]` is the token after `input_ids[b, t]`); `ignore_index` targets are
not scored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# Config fields of models whose logits are not just `hidden @ W.T + b` (scaled or soft-capped);
# the fused head would silently compute a different loss for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_mult")


def naive_lm_loss(model: nn.Module, input_ids: Tensor, targets: Tensor, *,
                  ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Reference: full logits from the model's own forward, upcast to fp32, then F.cross_entropy."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1),
                           ignore_index=ignore_index)


def lm_loss(model: nn.Module, input_ids: Tensor, targets: Tensor, *, chunk_tokens: int = 4096,
            ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the scored targets, differentiable w.r.t. all parameters.

    An fp32 scalar (fp64 for an fp64 model); equal to `naive_lm_loss` up to rounding.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    weight, bias = _lm_head(model)
    hidden = last_hidden_states(model, input_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.dtype != weight.dtype:  # e.g. under autocast; the head defines the compute dtype
        hidden = hidden.to(weight.dtype)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets.reshape(-1),
                                           chunk_tokens, ignore_index)


def _lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__} transforms its logits ({key}={value}); "
                             f"the chunked loss does not, use naive_lm_loss for this model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no linear LM head "
                         f"(get_output_embeddings() gave {type(head).__name__}); pass a "
                         f"Hugging Face *ForCausalLM model or use naive_lm_loss")
    return weight, getattr(head, "bias", None)


def last_hidden_states(model: nn.Module, input_ids: Tensor) -> Tensor:
    """`[batch, seq, hidden]` states that the LM head reads (final norm applied)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or base is model:
        raise ValueError(f"cannot find the base model of {type(model).__name__} (neither "
                         f"base_model nor get_decoder() gives one); use naive_lm_loss")
    return base(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`mean CE(hidden @ weight.T + bias, targets)` chunked over rows of `hidden`.

    Numerics: each chunk's logits are a matmul in the compute dtype (what the model's own
    head would produce), then upcast to the accumulation dtype (fp32, or fp64 for an fp64
    model, so that float64 reference checks stay exact); log-sum-exp, the target logit, the
    softmax gradient and all sums are in it, and grad_weight / grad_bias are accumulated
    across chunks in it and cast to the parameter dtype once, so low-precision rounding does
    not grow with the number of chunks.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int, ignore_index: int) -> Tensor:
        acc = _acc_dtype(weight)
        scored = targets != ignore_index
        safe_targets = torch.where(scored, targets, 0)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = _chunk_logits(hidden[rows], weight, bias)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            total += ((lse[rows] - target_logit) * scored[rows]).sum()
        # Same convention as F.cross_entropy: NaN when no target is scored.
        n_scored = scored.sum()
        ctx.save_for_backward(hidden, weight, bias, safe_targets, scored, lse, n_scored)
        ctx.chunk_tokens = chunk_tokens
        return total / n_scored

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, bias, targets, scored, lse, n_scored = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        acc = _acc_dtype(weight)
        scale = grad_loss.to(acc) / n_scored
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            h = hidden[rows]
            # d(loss)/d(logits) = (softmax - onehot(target)) * scored / n_scored.
            grad_logits = _chunk_logits(h, weight, bias).sub_(lse[rows, None]).exp_()
            # gather/scatter_ (one index per row) rather than an indexed -=: deterministic on CUDA.
            t = targets[rows, None]
            grad_logits.scatter_(1, t, grad_logits.gather(1, t) - 1.0)
            grad_logits.mul_((scored[rows] * scale)[:, None])
            if need_bias:
                grad_bias += grad_logits.sum(0)
            g = grad_logits.to(weight.dtype)
            del grad_logits
            if need_hidden:
                grad_hidden[rows] = g @ weight
            if need_weight:
                grad_weight += (g.t() @ h).to(acc)
        return (grad_hidden,
                grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None,
                None, None, None)


def _acc_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = F.linear(h, weight, bias)
    # A no-op for fp32 / fp64; for bf16 / fp16 one fp32 copy of the chunk.
    return logits.to(_acc_dtype(weight))
