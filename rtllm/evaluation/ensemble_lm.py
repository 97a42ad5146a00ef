"""`rtllm.EnsembleForCausalLM`: an ensemble of posterior samples used like one causal LM.

`forward` returns the log of the Bayesian model average (BMA) of the samples' next-token
distributions as `logits` (softmax of them is the BMA), optionally with per-token total,
aleatoric and epistemic uncertainty; `generate` continues a prompt greedily or by sampling
from the BMA, with one KV cache per sample.

One module (the architecture) runs every sample through `torch.func.functional_call`, so the
samples are tensors, not modules: compressed samples (delta8 / nf4) are held as their codes
(1 or 0.5 bytes per weight) next to one copy of the start and expanded one at a time for their
forward; plain samples are held in the compute dtype. Memory: the start (or first sample), plus
max_samples x (codes or weights), plus one expanded sample, plus a KV cache per sample.

Samples larger than the device: `from_ensemble(..., max_memory={0: "4GiB", "cpu": ...})` builds
each sample as its own model and dispatches it with accelerate (rtllm/evaluation/offload.py):
up to max_memory[device] of each sample's layers on the device, the rest in host memory (or on
disk under `offload_dir`), moved to the device layer by layer. Host memory then holds every
sample (max_samples x model bytes, less what is on disk).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from rtllm.evaluation.offload import load_dispatched, main_device
from rtllm.evaluation.streaming import _compute_dtype, load_ensemble_tokenizer, select_samples
from rtllm.lm.model_io import resolve_device
from rtllm.store.delta import DeltaCodec, codec_for
from rtllm.store.ensemble import Ensemble


@dataclass
class EnsembleOutput:
    """What `EnsembleForCausalLM.forward` returns (the fields transformers code reads, plus the
    uncertainty, in nats, [batch, positions], when asked for)."""

    logits: Tensor  # log BMA probabilities, [batch, positions, vocab]
    loss: Tensor | None = None  # mean NLL of the BMA on the shifted labels
    past_key_values: list | None = None  # one cache per sample
    entropy_total: Tensor | None = None  # H[BMA]
    aleatoric: Tensor | None = None  # sum_k w_k H[p_k]
    epistemic: Tensor | None = None  # total - aleatoric (the mutual information)

    def __getitem__(self, key: str) -> Any:  # output["logits"], as with ModelOutput
        return getattr(self, key)


@dataclass
class GenerateOutput:
    sequences: Tensor  # [batch, prompt + new]
    logprob: Tensor  # [batch, new]: log BMA probability of each generated token
    entropy_total: Tensor  # [batch, new]: of each generated token's distribution
    aleatoric: Tensor
    epistemic: Tensor


class EnsembleForCausalLM(torch.nn.Module):
    """The BMA of weighted samples as a causal LM (see the module docstring for memory)."""

    main_input_name = "input_ids"

    def __init__(self, model: torch.nn.Module,
                 samples: list[Callable[[], dict[str, Tensor]] | torch.nn.Module],
                 weights: list[float], tokenizer=None) -> None:
        super().__init__()
        if not samples or len(samples) != len(weights):
            raise ValueError(f"need one weight per sample and at least one sample, got "
                             f"{len(samples)} samples and {len(weights)} weights")
        if not all(w > 0 and math.isfinite(w) for w in weights):
            raise ValueError(f"sample weights must be finite and > 0, got {weights}")
        self.model = model.eval()
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self._samples = samples
        # transformers 5.x (by 5.24) renames past_key_values to cache, in forward and its output (the old
        # name warns); read the output's under the name forward took
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        total = sum(weights)
        self.register_buffer("log_weights", torch.tensor([math.log(w / total) for w in weights]),
                             persistent=False)
        self.tokenizer = tokenizer

    @classmethod
    def from_ensemble(cls, ensemble_dir: str | Path, *, max_samples: int | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      mask: Any = None, max_memory: dict | None = None,
                      offload_dir: str | Path | None = None) -> "EnsembleForCausalLM":
        """The samples of an output directory (`max_samples` of them, evenly spaced; `mask` as
        in rtllm.evaluate), on `device`; dtype None: the stored one (fp32 on CPU). With
        `max_memory` ({device: bytes}, per sample) each sample is dispatched by accelerate,
        the layers that do not fit offloaded (see the module docstring)."""
        device = resolve_device(device)
        ens = Ensemble(ensemble_dir, verify=True)
        used, _ = select_samples(ens.entries, mask=mask, max_samples=max_samples)
        first = used[0]["index"]
        model = ens.load_model(first, local_files_only=True)
        dtype = dtype or _compute_dtype(getattr(model.config, "dtype", None), device)
        tokenizer = load_ensemble_tokenizer(ens.out_dir)
        if max_memory is not None:
            members = [load_dispatched(ens, e["index"], dtype, max_memory,
                                       None if offload_dir is None else Path(offload_dir) / f"{e['index']:06d}")
                       for e in used]
            lm = cls(members[0], members, [e["weight"] for e in used], tokenizer=tokenizer)
            lm.log_weights = lm.log_weights.to(main_device(members[0]))  # .to() would undo the dispatch
            return lm
        model = model.to(device=device, dtype=dtype)
        starts: dict[str, dict[str, Tensor]] = {}  # one per chain in a merged ensemble
        samples = []
        for entry in used:
            codec = codec_for(entry)
            if codec is None:
                held = _to(ens.state_dict(entry["index"]), device, dtype)
                samples.append(lambda held=held: held)
            else:
                if entry["start"] not in starts:
                    starts[entry["start"]] = _to(ens.start(entry), device, None)
                codes = _to(ens.stored(entry["index"]), device, None)
                samples.append(_Expander(codec, codes, starts[entry["start"]], dtype))
        return cls(model, samples, [e["weight"] for e in used], tokenizer=tokenizer).to(device)

    @property
    def device(self) -> torch.device:
        return self.log_weights.device

    def __len__(self) -> int:
        return len(self._samples)

    def can_generate(self) -> bool:
        return True

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values: list | None = None, use_cache: bool = False,
                labels: Tensor | None = None, return_uncertainty: bool = False,
                **kwargs) -> EnsembleOutput:
        """Log BMA of the next-token distributions at every position of `input_ids`."""
        if past_key_values is not None and len(past_key_values) != len(self._samples):
            raise ValueError(f"past_key_values holds {len(past_key_values)} caches but the "
                             f"ensemble has {len(self._samples)} samples")
        log_bma = aleatoric = None
        caches = []
        for k, sample in enumerate(self._samples):
            call = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
            if past_key_values is not None:
                call[self._cache_kwarg] = past_key_values[k]
            if isinstance(sample, torch.nn.Module):  # a dispatched sample: its own model
                out = sample(**call)
            else:
                out = torch.func.functional_call(self.model, sample(), args=(), kwargs=call, strict=False)
            log_p = torch.log_softmax(out.logits.float(), dim=-1)
            weighted = log_p + self.log_weights[k]
            log_bma = weighted if log_bma is None else torch.logaddexp(log_bma, weighted)
            if return_uncertainty:
                h = -(log_p.exp() * log_p).sum(-1) * self.log_weights[k].exp()
                aleatoric = h if aleatoric is None else aleatoric + h
            caches.append(out[self._cache_kwarg] if use_cache else None)
            del out, log_p, weighted
        result = EnsembleOutput(logits=log_bma, past_key_values=caches if use_cache else None)
        if return_uncertainty:
            total = -(log_bma.exp() * log_bma).sum(-1)
            result.entropy_total, result.aleatoric = total, aleatoric
            result.epistemic = (total - aleatoric).clamp_min(0.0)  # MI >= 0; rounding can dip below
        if labels is not None:
            result.loss = torch.nn.functional.nll_loss(
                log_bma[:, :-1].reshape(-1, log_bma.shape[-1]), labels[:, 1:].reshape(-1))
        return result

    @torch.no_grad()
    def generate(self, input_ids: Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 return_dict_in_generate: bool = False, **kwargs) -> Tensor | GenerateOutput:
        """Continue `input_ids` [batch, prompt] (no padding) by `max_new_tokens` tokens: the
        argmax of the BMA, or (do_sample) a draw from it after temperature, top-k, top-p.
        Stops early once every row produced `eos_token_id`. return_dict_in_generate: also each
        new token's log probability under the BMA and total / aleatoric / epistemic uncertainty."""
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise ValueError("generate takes unpadded prompts: pass one prompt or prompts of one "
                             "length (attention_mask all ones)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        processors = _warpers(temperature, top_k, top_p) if do_sample else None
        input_ids = input_ids.to(self.device)
        seqs, caches, step_in = input_ids, None, input_ids
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=self.device)
        unc: dict[str, list[Tensor]] = {"logprob": [], "entropy_total": [], "aleatoric": [], "epistemic": []}
        for _ in range(max_new_tokens):
            out = self(step_in, past_key_values=caches, use_cache=True, return_uncertainty=True)
            caches = out.past_key_values
            scores = out.logits[:, -1]
            for key in ("entropy_total", "aleatoric", "epistemic"):
                unc[key].append(getattr(out, key)[:, -1])
            if do_sample:
                scores = processors(seqs, scores)
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            unc["logprob"].append(out.logits[:, -1].gather(1, token[:, None])[:, 0])
            seqs = torch.cat([seqs, token[:, None]], dim=1)
            step_in = token[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        if not return_dict_in_generate:
            return seqs
        return GenerateOutput(seqs, *(torch.stack(unc[k], 1) for k in unc))


class _Expander:
    """A compressed sample: its codes held, its weights expanded on each call."""

    def __init__(self, codec: DeltaCodec, codes: dict[str, Tensor], start: dict[str, Tensor],
                 dtype: torch.dtype) -> None:
        self.codec, self.codes, self.start, self.dtype = codec, codes, start, dtype

    def __call__(self) -> dict[str, Tensor]:
        return {k: v.to(self.dtype) if v.is_floating_point() else v
                for k, v in self.codec.decode(self.codes, self.start).items()}


def _to(state: dict[str, Tensor], device: torch.device, dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in state.items()}


def _warpers(temperature: float, top_k: int | None, top_p: float | None):
    """transformers' own logits warpers, so sampling means what it means in `model.generate`."""
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers
