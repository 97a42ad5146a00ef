"""Deep-ensemble members: the first stage of MILE (Sommer et al., ICLR 2025).

Each member starts from the given checkpoint (or, for small networks, from a fresh random
init) and is trained with AdamW under its own seed and data order, with early stopping on
held-out NLL. The best weights are saved as an ordinary `save_pretrained` directory (built in
a hidden sibling and renamed into place), so a finished member is reused when a MILE run is
resumed, and a killed one is simply trained again.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from rtllm.lm.data import MinibatchOrder, TokenData
from rtllm.run.config import MemberTraining
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling
from rtllm.lm.pretrain import publish_dir, sibling_path

MEMBER_INFO = "rtllm_member.json"
HELDOUT_SEQUENCES = 32  # held-out sequences per early-stopping evaluation


def member_seed(seed: int, member: int) -> int:
    """Seed of member k: distinct per member, reproducible alone (no state shared between them)."""
    return seed * 1_000_003 + member


def is_member_complete(member_dir: Path) -> bool:
    return (member_dir / MEMBER_INFO).is_file() and (member_dir / "config.json").is_file()


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, heldout: torch.Tensor, device: torch.device) -> float:
    """Mean next-token NLL (nats) over the first HELDOUT_SEQUENCES held-out sequences."""
    seqs = heldout[:HELDOUT_SEQUENCES].to(device)
    total = 0.0
    for part in seqs.split(8):
        total += float(lm_loss(model, part[:, :-1], part[:, 1:])) * len(part)
    return total / len(seqs)


def train_member(model_dir: str | Path, data: TokenData, out_dir: Path, *, member: int, seed: int,
                 settings: MemberTraining, device: torch.device, reuse: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Train member `member` and save its best weights in `out_dir`; returns its info dict.

    With `reuse`, a complete `out_dir` (a finished member) is taken as it is; without, it is
    retrained and replaced atomically.
    """
    out_dir = Path(out_dir)
    if reuse and is_member_complete(out_dir):
        info = json.loads((out_dir / MEMBER_INFO).read_text())
        log(f"member {member}: reusing {out_dir} (held-out NLL {info['best_heldout_nll']:.4f})")
        return info
    s = member_seed(seed, member)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=torch.float32, device=device)
    if settings.from_scratch:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            model = AutoModelForCausalLM.from_config(model.config).to(device)
    # Dropout off: the member's loss is then the same function the sampler sees afterwards.
    prepare_for_sampling(model, checkpointing=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    order = MinibatchOrder(len(data.train), min(settings.batch_size, len(data.train)), s)
    best = heldout_nll(model, data.heldout, device)
    start_nll, best_step, stale = best, 0, 0
    # The start competes too: if no evaluation beats it, the member is the start, not the last step.
    best_state = _host_copy(model)
    history = [{"step": 0, "heldout_nll": best}]
    t0 = time.perf_counter()
    for step in range(1, settings.max_steps + 1):
        seqs = data.train[order.batch(step - 1)].to(device)
        loss = lm_loss(model, seqs[:, :-1], seqs[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % settings.eval_every and step != settings.max_steps:
            continue
        nll = heldout_nll(model, data.heldout, device)
        history.append({"step": step, "heldout_nll": nll, "train_loss": float(loss.detach())})
        if nll < best:
            best, best_step, stale = nll, step, 0
            best_state = _host_copy(model)
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.load_state_dict(best_state)
    info = {"member": member, "seed": s, "start_heldout_nll": start_nll, "best_heldout_nll": best,
            "best_step": best_step, "steps_run": history[-1]["step"], "history": history,
            "settings": asdict(settings), "source": str(model_dir),
            "seconds": time.perf_counter() - t0}
    log(f"member {member}: held-out NLL {start_nll:.4f} -> {best:.4f} (best at step {best_step}, "
        f"{info['steps_run']} steps, {info['seconds']:.0f} s)")
    _save_member(out_dir, model, tokenizer, info)
    return info


def _host_copy(model: torch.nn.Module) -> dict:
    """The weights on the host: a copy on the GPU would double the model there."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_member(out_dir: Path, model, tokenizer, info: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_path(out_dir, "tmp")
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The info file marks the member complete, so it is written last.
        (tmp / MEMBER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

