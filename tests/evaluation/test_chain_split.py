"""Within/between-chain uncertainty (rtllm/evaluation/chain_split.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from rtllm.evaluation.chain_split import split_by_chain


def entropy(p):
    return -(p * np.log(p)).sum(-1)


def result(probs, chains, is_ood):
    """An EvalResult-like object for samples probs [S, N, V] (equal weights) of these chains."""
    mean = probs.mean(0)
    table = {"entropy_total": entropy(mean), "epistemic": entropy(mean) - entropy(probs).mean(0),
             "is_ood": is_ood, "window": np.arange(len(is_ood)) // 2}
    samples = [{"chain": c, "weight": 1.0 / len(chains)} for c in chains]
    return SimpleNamespace(table=table, samples=samples, summary={"nll_bma": 1.0})


def test_between_plus_within_is_the_mutual_information_and_vanishes_for_one_mode():
    rng = np.random.default_rng(0)
    n, v = 16, 5
    is_ood = np.arange(n) >= 8  # windows of 2 tokens: 4 ID windows, 4 OOD ones
    # Two chains around different modes on the OOD tokens, the same mode in distribution.
    base = rng.dirichlet(np.ones(v), size=n)
    modes = [base, np.where(is_ood[:, None], rng.dirichlet(np.ones(v), size=n), base)]
    probs = {c: np.stack([0.9 * modes[c] + 0.1 * rng.dirichlet(np.ones(v), size=n) for _ in range(3)])
             for c in (0, 1)}
    probs[1][:, ~is_ood] = probs[0][:, ~is_ood]  # in distribution the chains hold the same samples
    total = result(np.concatenate([probs[0], probs[1]]), [0] * 3 + [1] * 3, is_ood)
    split = split_by_chain(total, {c: result(probs[c], [c] * 3, is_ood) for c in (0, 1)})
    within = 0.5 * (result(probs[0], [0] * 3, is_ood).table["epistemic"] +
                    result(probs[1], [1] * 3, is_ood).table["epistemic"])
    between = total.table["epistemic"] - within
    assert split["mean_within"] == pytest.approx(within[~is_ood].mean(), rel=1e-12)
    assert split["mean_between"] == pytest.approx(between[~is_ood].mean(), rel=1e-12, abs=1e-15)
    assert split["mean_between"] < 1e-12 < split["mean_between_ood"]  # the chains agree in distribution
    assert split["auroc_ood_between"] == 1.0 and split["n_chains"] == 2
    assert [c["weight"] for c in split["per_chain"]] == [0.5, 0.5]
    json.dumps(split)
