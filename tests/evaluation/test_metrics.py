"""Per-token uncertainty math vs brute-force numpy; ECE, AUROC."""
import itertools
import math

import numpy as np
import pytest
import torch

from rtllm.evaluation import metrics
from rtllm.evaluation.metrics import PredictiveAccumulator, auroc, ece, reliability

# 3 samples x 4 tokens x vocab 7, each row an explicit distribution (rows sum to 1).
P = np.array([
    [[.40, .20, .10, .10, .10, .05, .05], [.90, .02, .02, .02, .02, .01, .01],
     [1/7] * 7, [.05, .05, .05, .05, .05, .05, .70]],
    [[.10, .40, .20, .10, .10, .05, .05], [.85, .05, .02, .02, .02, .02, .02],
     [.30, .10, .10, .10, .10, .10, .20], [.70, .05, .05, .05, .05, .05, .05]],
    [[.20, .20, .20, .20, .10, .05, .05], [.80, .10, .02, .02, .02, .02, .02],
     [.02, .02, .02, .02, .02, .02, .88], [.05, .70, .05, .05, .05, .05, .05]],
])
TARGETS = np.array([1, 0, 6, 3])


def brute_force(p, targets, weights):
    """Loops over tokens and vocabulary, float64, straight from algorithms.md section 4."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    S, N, V = p.shape
    out = {k: [] for k in ("nll_bma", "p_observed", "entropy_total", "aleatoric", "epistemic",
                           "nll_samples_mean", "confidence", "brier", "correct")}
    for n in range(N):
        bma = [sum(w[s] * p[s, n, v] for s in range(S)) for v in range(V)]
        y = targets[n]
        total = -sum(q * math.log(q) for q in bma if q > 0)
        alea = sum(w[s] * -sum(q * math.log(q) for q in p[s, n] if q > 0) for s in range(S))
        out["nll_bma"].append(-math.log(bma[y]))
        out["p_observed"].append(bma[y])
        out["entropy_total"].append(total)
        out["aleatoric"].append(alea)
        out["epistemic"].append(total - alea)
        out["nll_samples_mean"].append(sum(w[s] * -math.log(p[s, n, y]) for s in range(S)))
        out["confidence"].append(max(bma))
        out["brier"].append(sum((bma[v] - (v == y)) ** 2 for v in range(V)))
        out["correct"].append(int(np.argmax(bma)) == y)
    return {k: np.array(v) for k, v in out.items()}


def accumulate(p_or_logits, targets, weights, *, logits=False, block_bytes=1 << 20):
    acc = PredictiveAccumulator(torch.as_tensor(targets), block_bytes=block_bytes)
    for s, w in enumerate(weights):
        x = torch.as_tensor(p_or_logits[s], dtype=torch.float32)
        acc.add(x if logits else x.log(), w)
    return {k: v.numpy() for k, v in acc.finalize().items()}


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 2, 3), (0.2, 0.5, 0.3)])
@pytest.mark.parametrize("block_bytes", [1, 1 << 20])  # 1: one row per block
def test_accumulator_matches_brute_force(weights, block_bytes):
    got = accumulate(P, TARGETS, weights, block_bytes=block_bytes)
    want = brute_force(P, TARGETS, weights)
    for key in want:
        if key == "correct":
            np.testing.assert_array_equal(got[key], want[key])
        else:  # fp32 inputs: log p and the BMA mean carry ~1e-7 relative rounding
            np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=2e-7, err_msg=key)
    assert (got["epistemic"] >= 0).all()


def test_mutual_information_zero_for_identical_samples_positive_for_different():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 384, generator=gen) * 3
    same = accumulate([logits] * 5, torch.randint(384, (50,), generator=gen), [1] * 5,
                      logits=True)
    assert np.abs(same["epistemic"]).max() < 1e-6
    np.testing.assert_allclose(same["entropy_total"], same["aleatoric"], atol=1e-6)
    np.testing.assert_allclose(same["nll_bma"], same["nll_samples_mean"], atol=1e-6)
    other = [logits + torch.randn(50, 384, generator=gen) for _ in range(3)]
    diff = accumulate(other, torch.zeros(50, dtype=torch.long), [1] * 3, logits=True)
    assert (diff["epistemic"] > 1e-3).all()
    # Jensen: the BMA's NLL is at most the mean NLL of the samples
    assert (diff["nll_bma"] <= diff["nll_samples_mean"] + 1e-9).all()


def test_observed_token_far_below_fp32_range_keeps_finite_nll():
    logits = torch.tensor([[0.0, -300.0, 5.0]])  # p(token 1) ~ e^-305, below fp32's ~1e-45
    got = accumulate([logits, logits + torch.tensor([0.0, 100.0, 0.0])], torch.tensor([1]),
                     [1, 1], logits=True)
    assert np.isfinite(got["nll_bma"]).all() and 200 < got["nll_bma"][0] < 206


def test_masked_vocabulary_entries_are_ignored():
    logits = torch.tensor([[1.0, -math.inf, 0.0, 2.0]])
    got = accumulate([logits, logits], torch.tensor([0]), [1, 1], logits=True)
    p = torch.softmax(logits[0, [0, 2, 3]].double(), 0).numpy()
    assert got["entropy_total"][0] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)
    assert np.isfinite(got["aleatoric"]).all()


def test_token_nll_matches_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(37, 11, generator=gen), torch.randint(11, (37,), generator=gen)
    want = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(metrics.token_nll(logits, targets, block_bytes=200), want)


# -- ECE --------------------------------------------------------------------------------------
def ece_brute(conf, correct, n_bins, equal_mass):
    if equal_mass:
        groups = np.array_split(np.argsort(conf, kind="stable"), n_bins)
    else:
        edges = np.linspace(0, 1, n_bins + 1)
        groups = [np.where((conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi)))[0]
                  for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    return sum(len(g) / len(conf) * abs(correct[g].mean() - conf[g].mean()) for g in groups
               if len(g))


@pytest.mark.parametrize("equal_mass", [False, True])
@pytest.mark.parametrize("n", [1, 17, 1000])
def test_ece_matches_brute_force(equal_mass, n):
    rng = np.random.default_rng(n)
    conf = rng.uniform(size=n)
    conf[:3] = [0.0, 1.0, 2 / 15][:n]  # bin edges
    correct = rng.uniform(size=n) < conf ** 2
    assert ece(conf, correct, equal_mass=equal_mass) == pytest.approx(
        ece_brute(conf, correct, 15, equal_mass), abs=1e-12)
    rel = reliability(conf, correct, equal_mass=equal_mass)
    assert rel["count"].sum() == n


def test_ece_near_zero_when_outcomes_drawn_from_the_predictions():
    # Predicted distributions over 5 tokens; the observed token is drawn from them, so
    # P(argmax is right) = max p: calibrated. Per bin, sum(correct) - sum(conf) has mean 0 and
    # sd <= sqrt(n_b)/2, so E[ECE] <= 0.4 sqrt(15 / N) = 0.0049 and sd(ECE) ~ 0.3 / sqrt(N)
    # = 0.001 for N = 1e5: the bound 0.01 is > 5 sigma above the mean.
    rng = np.random.default_rng(0)
    n = 100_000
    p = rng.dirichlet(np.full(5, 0.5), size=n)
    observed = (rng.uniform(size=(n, 1)) > p.cumsum(1)).sum(1)
    conf, correct = p.max(1), p.argmax(1) == observed
    assert ece(conf, correct) < 0.01 and ece(conf, correct, equal_mass=True) < 0.01
    # Overconfident (p^4 renormalized) predictions of the same outcomes: ECE ~ 0.1, far above.
    sharp = p ** 4 / (p ** 4).sum(1, keepdims=True)
    assert ece(sharp.max(1), sharp.argmax(1) == observed) > 0.05


# -- AUROC ------------------------------------------------------------------------------------
def auroc_pairs(neg, pos):
    return np.mean([1.0 if b > a else 0.5 if b == a else 0.0
                    for a, b in itertools.product(neg, pos)])


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    neg = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)  # few values: many ties
    pos = rng.integers(2, 8, size=rng.integers(1, 40)).astype(float)
    assert auroc(neg, pos) == pytest.approx(auroc_pairs(neg, pos), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0
    assert auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan], [1.0])
