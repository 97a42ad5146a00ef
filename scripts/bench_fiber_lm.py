"""The fiber rows of scripts/bench_samplers_lm.py: walk samples and map-generated samples.

Same model, minibatch order, gradient budget and test windows as the other samplers. K =
`PARTICLES` particles share the budget (budget / K walk steps each, no tuning: lr, drift and
tolerance are `rtllm fiber`'s defaults, chosen by the sweep in docs/fiber.md). Every `thin` steps
the walker's loss on 8 validation sequences is checked against the start's (a forward each,
counted as "other"); iterates within the tolerance are kept, one outside is pulled back by
gradient steps without drift. The walk ensemble is `samples` kept iterates evenly spaced over
all kept ones; the generated ensemble is `samples` draws of a rank-k PCA map fitted to all
kept offsets (no gradients), of which the fraction inside the tolerance is reported.
"""
from __future__ import annotations

import copy
import time

import torch

from rtllm.evaluation import metrics
from rtllm.lm.data import MinibatchOrder
from rtllm.lm.loss import lm_loss
from rtllm.run.fiber import flat_position, set_flat_position
from rtllm.run.fiber_config import FiberConfig
from rtllm.samplers.fiber import FiberWalk
from rtllm.samplers.fiber_map import fit_pca_map

PARTICLES = 2
RANK = 4
EVAL_SEQUENCES = 8


def run_fiber(p, s, score) -> dict[str, tuple[dict, metrics.PredictiveAccumulator]]:
    """{'fiber-walk': (result, acc), 'fiber-generated': (result, acc)}; score(model, windows, acc)."""
    defaults = FiberConfig(model="", train=(), out="")
    t0 = time.perf_counter()
    model = copy.deepcopy(p.model)
    walk = FiberWalk([q for q in model.parameters() if q.requires_grad], lr=defaults.lr, drift=defaults.drift,
                     seed=s.seed)
    order = MinibatchOrder(len(p.data.train), s.batch_size, s.seed)
    eval_batch = p.data.heldout[:EVAL_SEQUENCES]

    @torch.no_grad()
    def eval_loss() -> float:
        return float(lm_loss(model, eval_batch[:, :-1], eval_batch[:, 1:]))

    start, forwards, grads = flat_position(walk), 1, 0
    limit = eval_loss() + defaults.tolerance
    steps = s.budget // PARTICLES
    thin = max(1, steps // (2 * s.samples // PARTICLES + 1))
    kept, pullbacks = [], 0
    for i in range(PARTICLES):
        set_flat_position(walk, start)
        walk.particle = i
        pulling = False
        for t in range(steps):
            seqs = p.data.train[order.batch(grads)]
            walk.zero_grad()
            lm_loss(model, seqs[:, :-1], seqs[:, 1:]).backward()
            grads += 1
            walk.step(drift=not pulling)
            if not pulling and (t + 1) % thin:
                continue
            forwards += 1
            inside = eval_loss() <= limit
            pullbacks += not inside and not pulling
            pulling = not inside
            if inside and (t + 1) % thin == 0:
                kept.append(flat_position(walk) - start)
    seconds = time.perf_counter() - t0
    out = {}
    if not kept:
        raise RuntimeError("the fiber walk kept no iterate: raise the tolerance or lower lr / drift")
    pick = torch.linspace(0, len(kept) - 1, min(s.samples, len(kept))).round().long().tolist()
    acc = metrics.PredictiveAccumulator(p.test[:, 1:])
    for j in pick:
        set_flat_position(walk, start + kept[j])
        score(model, p.test, acc)
    common = {"grads_tune": 0, "grads_sample": grads, "forwards_tune": forwards, "seconds": seconds}
    out["fiber-walk"] = ({**common, "samples": len(pick), "kept": len(kept), "pullbacks": pullbacks,
                          "tuned_text": f"lr {defaults.lr:g}, drift {defaults.drift:g}, {len(kept)} kept"}, acc)
    rank = min(RANK, len(kept) - 1)
    if rank < 1:  # fewer than two kept iterates: no map to fit, no generated row
        return out
    acc = metrics.PredictiveAccumulator(p.test[:, 1:])
    inside = 0
    fitted = fit_pca_map(torch.stack(kept), rank)
    for offset in fitted.sample(s.samples, torch.Generator().manual_seed(s.seed)):
        set_flat_position(walk, start + offset)
        inside += eval_loss() <= limit
        score(model, p.test, acc)
    out["fiber-generated"] = ({**common, "samples": s.samples, "forwards_tune": forwards + s.samples,
                               "tuned_text": f"PCA rank {rank}, {inside}/{s.samples} within tolerance"}, acc)
    return out
