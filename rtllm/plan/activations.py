"""Peak memory of one forward+backward of the sampling run's loss, as the code runs it.

What runs: `rtllm.lm.loss.lm_loss` on a Hugging Face GPT-2 prepared by `prepare_for_sampling`
(activation checkpointing of every block, non-reentrant; SDPA attention; the fused, chunked
LM-head cross-entropy that never holds the full logits). Gradients land in the sampler's
preallocated buffer, so they are not counted here; weight-gradient temporaries are.

The model is a ledger: the tensors that come to life and die along the forward and backward,
in program order, with their sizes; the estimate is the ledger's peak. Which tensors autograd
keeps was read from the code (GPT2Block, NewGELUActivation, ChunkedLinearCrossEntropy) and
checked against a trace of allocations on CPU (scripts/bench_plan.py, tests/test_plan.py).
Scratch memory inside single ops is included where it is large: logsumexp's exp(x - max)
temporary, the CUDA flash-attention backward's fp32 dq accumulator.

Only GPT-2-type blocks are modelled; other architectures raise UnknownArchitecture rather
than getting a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

# Categories of the ledger; the planner shows each as a component.
SAVED = "activations: saved block inputs"
BLOCK = "activations: block internals"
LOSS = "loss / logits"
WGRAD = "weight-grad temporaries"
PARTS = (SAVED, BLOCK, LOSS, WGRAD)

KNOWN_ARCHITECTURES = ("gpt2",)
# Elementwise activations implemented as one op (its backward saves only the input) vs
# GPT-2's default gelu_new, a Python formula whose autograd keeps four [tokens, n_inner]
# tensors.
_FUSED_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "quick_gelu", "silu")
_TANH_FORMULA_ACTIVATIONS = ("gelu_new", "gelu_fast")


class UnknownArchitecture(ValueError):
    """The activation model does not know this architecture (it will not guess)."""


@dataclass(frozen=True)
class ActivationPeak:
    parts: dict[str, int]  # bytes per category at the peak
    phase: str  # where the peak falls, e.g. "backward of block 47"

    @property
    def total(self) -> int:
        return sum(self.parts.values())


class _Ledger:
    """Live tensors by name; remembers the per-category bytes at the highest point."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[str, int]] = {}
        self.now = 0
        self.peak = -1
        self.at_peak: dict[str, int] = {}
        self.phase = ""
        self.peak_phase = ""

    def add(self, name: str, part: str, nbytes: int) -> None:
        if name in self.live:
            raise AssertionError(f"ledger: {name} is already live")
        self.live[name] = (part, int(nbytes))
        self.now += int(nbytes)
        if self.now > self.peak:
            self.peak = self.now
            self.peak_phase = self.phase
            self.at_peak = {p: 0 for p in PARTS}
            for p, n in self.live.values():
                self.at_peak[p] += n

    def drop(self, *names: str) -> None:
        for name in names:
            self.now -= self.live.pop(name)[1]

    def rename(self, old: str, new: str, part: str | None = None) -> None:
        """The same tensor under a new name (e.g. a no-op cast), optionally in another category."""
        old_part, nbytes = self.live.pop(old)
        self.live[new] = (part or old_part, nbytes)


@dataclass(frozen=True)
class _Dims:
    batch: int  # sequences per forward/backward (the micro-batch)
    seq: int
    hidden: int
    inner: int
    heads: int
    layers: int
    vocab: int
    positions: int
    a: int  # bytes per element of the compute dtype
    acc: int  # bytes per element of the accumulation dtype (fp32, or fp64 for an fp64 model)
    chunk: int  # tokens per cross-entropy chunk
    tied: bool
    fused_act: bool
    cuda: bool

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def activation_peak(config, *, batch: int, seq: int, itemsize: int, device: str,
                    checkpointing: bool = True, checkpoint_every: int = 1,
                    chunk_tokens: int | None = None) -> ActivationPeak:
    """Peak bytes above the weights and sampler state during one forward+backward.

    batch: sequences per forward/backward (the micro-batch); itemsize: bytes per element of the
    compute dtype (2 for bf16); device: 'cuda' or 'cpu' (picks the attention kernels' extras);
    checkpoint_every: k checkpoints blocks 0, k, 2k, ... (rtllm.lm.model_io.prepare_for_sampling);
    chunk_tokens: the loss's chunk (default: lm_loss's own default).
    """
    if chunk_tokens is None:
        chunk_tokens = _lm_loss_chunk_default()
    model_type = getattr(config, "model_type", None)
    if model_type not in KNOWN_ARCHITECTURES:
        raise UnknownArchitecture(
            f"the activation model knows {', '.join(KNOWN_ARCHITECTURES)} blocks, not "
            f"{model_type!r}; its activation memory is not estimated")
    act = config.activation_function
    if act not in _FUSED_ACTIVATIONS + _TANH_FORMULA_ACTIVATIONS:
        raise UnknownArchitecture(f"the activation model does not know activation {act!r} "
                                  f"(knows {', '.join(_FUSED_ACTIVATIONS + _TANH_FORMULA_ACTIVATIONS)})")
    if getattr(config, "add_cross_attention", False):
        raise UnknownArchitecture("GPT-2 with cross-attention is not modelled")
    d = _Dims(batch=batch, seq=seq, hidden=config.n_embd,
              inner=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
              heads=config.n_head, layers=config.n_layer, vocab=config.vocab_size,
              positions=config.n_positions, a=itemsize, acc=max(itemsize, 4),
              chunk=min(chunk_tokens, batch * seq), tied=bool(getattr(config, "tie_word_embeddings", True)),
              fused_act=act in _FUSED_ACTIVATIONS, cuda=device.startswith("cuda"))
    led = _Ledger()
    checkpointed = [checkpointing and i % checkpoint_every == 0 for i in range(d.layers)]
    _gpt2_forward_backward(led, d, checkpointed)
    return ActivationPeak(parts=dict(led.at_peak), phase=led.peak_phase)


# -- GPT-2 ----------------------------------------------------------------------------------------
def _lm_loss_chunk_default() -> int:
    import inspect

    from rtllm.lm.loss import lm_loss

    return inspect.signature(lm_loss).parameters["chunk_tokens"].default


def _gpt2_forward_backward(led: _Ledger, d: _Dims, checkpointed: list[bool]) -> None:
    N, C, a = d.tokens, d.hidden, d.a
    h = N * C * a
    led.phase = "forward"
    led.add("inputs_embeds", SAVED, h)  # a local of GPT2Model.forward until it returns
    led.add("position_embeds", SAVED, d.seq * C * a)
    led.add("hidden0", SAVED, h)
    for i in range(d.layers):
        led.phase = f"forward of block {i}"
        _block_forward(led, d, i, "checkpointed" if checkpointed[i] else "full")
    led.phase = "forward"
    led.add("lnf_out", SAVED, h)  # saved by the loss
    led.add("lnf_stats", SAVED, 2 * N * d.acc)
    led.drop("inputs_embeds", "position_embeds")
    _loss_forward(led, d)
    _loss_backward(led, d)
    led.phase = "backward of the final norm"
    led.add("dh", SAVED, h)
    led.drop("lnf_stats", f"hidden{d.layers}", "grad_hidden")
    for i in reversed(range(d.layers)):
        if checkpointed[i]:
            led.phase = f"recompute of block {i}"
            _block_forward(led, d, i, "recompute")
        led.phase = f"backward of block {i}"
        _block_backward(led, d, i)
    led.phase = "backward of the embeddings"
    led.add("dpos", WGRAD, d.seq * C * a)  # position_embeds broadcast over the batch: summed
    led.add("dwpe", WGRAD, d.positions * C * a)
    led.drop("dpos", "dwpe")
    led.add("dwte", WGRAD, d.vocab * C * a)  # embedding backward is dense
    # Tied: autograd adds this to the LM head's gradient in place (it owns that tensor alone).
    led.drop("dwte", *(["head_grad"] if d.tied else []))
    led.drop("dh")


def _block_forward(led: _Ledger, d: _Dims, i: int, mode: str) -> None:
    """One GPT2Block forward. mode 'checkpointed': the checkpoint's forward, only locals live;
    'recompute': autograd keeps what it saves, and the run stops after the last saved tensor;
    'full' (no checkpointing): autograd keeps what it saves, to the end of the block."""
    N, C, F, a = d.tokens, d.hidden, d.inner, d.a
    h, f = N * C * a, N * F * a
    save = mode != "checkpointed"
    k = f"{i}."

    def temp(*names: str) -> None:  # freed now unless autograd saved it
        if not save:
            led.drop(*(k + n for n in names))

    led.add(k + "x1", BLOCK, h)
    led.add(k + "stats1", BLOCK, 2 * N * d.acc)
    temp("stats1")
    led.add(k + "qkv", BLOCK, 3 * h)
    led.add(k + "attn", BLOCK, h)  # SDPA output; flash kernels never hold [seq, seq] scores
    led.add(k + "lse", BLOCK, d.batch * d.heads * d.seq * 4)
    temp("lse")
    led.add(k + "cproj", BLOCK, h)  # GPT2Block's local `attn_output`, alive to the block's end
    temp("qkv", "attn")
    led.add(k + "h1", BLOCK, h)
    temp("x1")
    led.add(k + "x2", BLOCK, h)
    led.add(k + "stats2", BLOCK, 2 * N * d.acc)
    temp("stats2")
    led.add(k + "fc", BLOCK, f)
    if d.fused_act:
        led.add(k + "act", BLOCK, f)
        temp("fc")
    else:
        # 0.5*x * (1 + tanh(c*(x + 0.044715*x**3))): u and w feed the final product (saved),
        # tanh saves its output t; the other intermediates are temporaries, two at a time.
        led.add(k + "u", BLOCK, f)
        led.add(k + "p", BLOCK, f)
        led.add(k + "q", BLOCK, f)
        led.drop(k + "p")
        led.add(k + "s", BLOCK, f)
        led.drop(k + "q")
        led.add(k + "r", BLOCK, f)
        led.drop(k + "s")
        led.add(k + "t", BLOCK, f)
        led.drop(k + "r")
        led.add(k + "w", BLOCK, f)
        temp("t")
        led.add(k + "act", BLOCK, f)
        temp("u", "w", "fc")
    if mode == "recompute":
        # The recompute stops once the last saved tensor exists; the block's locals die then.
        led.drop(k + "cproj")
        return
    led.add(k + "mlp_out", BLOCK, h)
    temp("act", "x2")
    led.add(f"hidden{i + 1}", SAVED, h)  # the block's output; then its locals die
    led.drop(k + "mlp_out", k + "cproj")
    temp("h1")


def _weight_grads(led: _Ledger, d: _Dims, name: str, n_in: int, n_out: int) -> None:
    """Conv1D backward's weight and bias gradients: accumulated into the buffer, then freed."""
    led.add(name + ".dW", WGRAD, n_in * n_out * d.a)
    led.add(name + ".db", WGRAD, n_out * d.a)
    led.drop(name + ".dW", name + ".db")


def _block_backward(led: _Ledger, d: _Dims, i: int) -> None:
    N, C, F, a = d.tokens, d.hidden, d.inner, d.a
    h, f = N * C * a, N * F * a
    k = f"{i}."
    # MLP: c_proj, the activation, c_fc. The incoming gradient dh also flows to the residual.
    led.add(k + "d_act", BLOCK, f)
    _weight_grads(led, d, k + "mlp.c_proj", F, C)
    led.drop(k + "act")
    if d.fused_act:
        led.add(k + "d_fc", BLOCK, f)
        led.drop(k + "d_act")
    else:
        led.add(k + "du", BLOCK, f)
        led.add(k + "dw", BLOCK, f)
        led.drop(k + "d_act", k + "u", k + "w")
        led.add(k + "dr", BLOCK, f)  # tanh backward
        led.drop(k + "t", k + "dw")
        led.add(k + "ds", BLOCK, f)
        led.drop(k + "dr")
        led.add(k + "dp", BLOCK, f)  # pow backward: 3 * x**2 * grad, in three ops
        led.add(k + "x2sq", BLOCK, f)
        led.add(k + "x2sq3", BLOCK, f)
        led.add(k + "dpx", BLOCK, f)
        led.drop(k + "x2sq", k + "x2sq3", k + "dp")
        led.add(k + "d_fc", BLOCK, f)  # the three paths into x summed
        led.drop(k + "du", k + "ds", k + "dpx")
    led.add(k + "dx2", BLOCK, h)
    _weight_grads(led, d, k + "mlp.c_fc", C, F)
    led.drop(k + "fc", k + "d_fc", k + "x2")
    led.add(k + "dh1_ln", BLOCK, h)  # ln_2 backward
    _weight_grads(led, d, k + "ln_2", 1, C)
    led.drop(k + "dx2", k + "stats2", k + "h1")
    led.add(k + "dh1", BLOCK, h)  # plus the residual's gradient
    led.drop(k + "dh1_ln", "dh")
    # Attention: c_proj, SDPA, c_attn, ln_1.
    led.add(k + "d_attn", BLOCK, h)
    _weight_grads(led, d, k + "attn.c_proj", C, C)
    led.add(k + "dq", BLOCK, h)
    led.add(k + "dk", BLOCK, h)
    led.add(k + "dv", BLOCK, h)
    if d.cuda:  # flash attention's backward accumulates dq in fp32
        led.add(k + "dq_acc", BLOCK, N * C * 4)
        led.drop(k + "dq_acc")
    led.drop(k + "attn", k + "lse", k + "d_attn")
    led.add(k + "dqkv", BLOCK, 3 * h)  # the split's backward concatenates
    led.drop(k + "dq", k + "dk", k + "dv")
    led.add(k + "dx1", BLOCK, h)
    _weight_grads(led, d, k + "attn.c_attn", C, 3 * C)
    led.drop(k + "qkv", k + "dqkv", k + "x1")
    led.add(k + "dh0_ln", BLOCK, h)  # ln_1 backward
    _weight_grads(led, d, k + "ln_1", 1, C)
    led.drop(k + "dx1", k + "stats1")
    led.add("dh_next", SAVED, h)  # plus the residual's gradient
    led.drop(k + "dh0_ln", k + "dh1", f"hidden{i}")  # hidden{i}: the block's saved input
    led.rename("dh_next", "dh")


# -- the chunked LM-head cross-entropy (rtllm.lm.loss) ----------------------------------------------
def _loss_forward(led: _Ledger, d: _Dims) -> None:
    N, n, V = d.tokens, d.chunk, d.vocab
    led.phase = "loss forward"
    led.add("targets", LOSS, N * 8)  # reshape of a strided slice: a copy
    led.add("scored", LOSS, N)
    led.add("safe_targets", LOSS, N * 8)
    led.add("lse", LOSS, N * d.acc)
    led.add("logits", LOSS, n * V * d.a)
    if d.a != d.acc:
        led.add("logits_acc", LOSS, n * V * d.acc)
        led.drop("logits")
        led.rename("logits_acc", "logits")
    led.add("logsumexp_tmp", LOSS, n * V * d.acc)  # exp(x - max) inside logsumexp
    led.drop("logsumexp_tmp", "logits")


def _loss_backward(led: _Ledger, d: _Dims) -> None:
    N, n, V, C = d.tokens, d.chunk, d.vocab, d.hidden
    led.phase = "loss backward"
    led.add("grad_hidden", SAVED, N * C * d.a)
    led.add("grad_weight", LOSS, V * C * d.acc)
    led.add("grad_logits", LOSS, n * V * d.a)
    if d.a != d.acc:
        led.add("grad_logits_acc", LOSS, n * V * d.acc)
        led.drop("grad_logits")
        led.add("g", LOSS, n * V * d.a)  # cast back for the matmuls
        led.drop("grad_logits_acc")
    else:
        led.rename("grad_logits", "g")
    led.add("g_hidden", LOSS, n * C * d.a)
    led.drop("g_hidden")
    led.add("gw_chunk", LOSS, V * C * d.a)
    if d.a != d.acc:
        led.add("gw_chunk_acc", LOSS, V * C * d.acc)
        led.drop("gw_chunk_acc")
    led.drop("gw_chunk", "g")
    if d.a != d.acc:
        led.add("head_grad", WGRAD, V * C * d.a)
        led.drop("grad_weight")
    else:
        led.rename("grad_weight", "head_grad", WGRAD)  # .to() is a no-op
    led.drop("lnf_out", "targets", "scored", "safe_targets", "lse")
    if not d.tied:  # an untied head's gradient is accumulated at once
        led.drop("head_grad")
