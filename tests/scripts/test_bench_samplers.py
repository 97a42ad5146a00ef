"""scripts/bench_samplers.py: its building blocks against exact answers, and a smoke run of
every part (--quick with tiny sizes) checking budgets, ensemble sizes and the JSON."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from repo_paths import SCRIPTS
import rtllm
from rtllm.samplers.autocorr import integrated_autocorr_time

sys.path.insert(0, str(SCRIPTS))
import bench_samplers  # noqa: E402
import bench_samplers_analytic as A  # noqa: E402


@pytest.fixture
def one_thread():
    """main() sets the torch thread count; give the rest of the session its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("target", A.make_targets(40, 20, 10), ids=lambda t: t.name)
def test_targets_exact_draws_match_log_density_and_second_moments(target):
    """Stein's identity E[x_i d/dx_i ln p] = -1 ties log_prob to the exact sampler, and the
    draws' mean of x_i^2 / E[x_i^2] is 1. 4000 draws; thresholds 5 SE (SE from the draws)."""
    x = target.draw(torch.Generator().manual_seed(0), 4000)
    _, grad = A.value_and_grad(target.log_prob, x)
    stein = (x * grad).mean(-1).numpy()  # per draw, mean over coordinates
    assert abs(stein.mean() + 1) < 5 * stein.std() / math.sqrt(len(stein)), stein.mean()
    ratio = (x ** 2 / torch.from_numpy(target.second_moment)).mean(-1).numpy()
    assert abs(ratio.mean() - 1) < 5 * ratio.std() / math.sqrt(len(ratio)), ratio.mean()


@pytest.mark.parametrize("kind, cls", [("ray", rtllm.RayTracer), ("hmc", rtllm.HMC)])
def test_step_form_is_the_optimizers_step(kind, cls):
    """Without refresh noise the float64 step form and the fp32 optimizer take the same steps
    from the same velocity: agreement to fp32 rounding (measured 1e-7..2e-7) over 6 steps."""
    g = torch.Generator().manual_seed(3)
    x0, v0 = torch.randn(2, 17, generator=g, dtype=torch.float64)
    sigma = torch.linspace(0.5, 2, 17, dtype=torch.float64)
    p = torch.nn.Parameter(x0.float().clone())
    opt = cls([p], dt=0.1, scale_likelihood=1.0, refresh_rate=0.0, seed=0)
    opt.momentum = [v0.float()]
    ours = []
    for _ in range(6):
        with torch.no_grad():
            p.grad.copy_(p / sigma.float() ** 2)
        opt.step()
        ours.append(p.detach().double().clone())
    ref = A.run_step_form(kind, lambda x: -0.5 * ((x / sigma) ** 2).sum(-1), x0[None], dt=0.1, steps=6,
                          thin=1, refresh_rate=0.0, v0=v0[None])
    assert max(float((a - b[0]).abs().max()) for a, b in zip(ours, ref)) < 1e-6


def test_noisy_gradient_adds_sigma_times_fresh_noise():
    lp = A.gaussian("g", torch.ones(5)).log_prob
    x = torch.randn(3, 5, dtype=torch.float64)
    sigma = torch.tensor([0.0, 1.0, 3.0])
    noisy = A.NoisyGradient(lp, sigma, seed=4)
    xi = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    diff = A.value_and_grad(noisy, x)[1] - A.value_and_grad(lp, x)[1]
    torch.testing.assert_close(diff, sigma[:, None] * xi)
    assert not torch.equal(A.value_and_grad(noisy, x)[1], A.value_and_grad(noisy, x)[1])  # fresh


def test_ess_sees_through_period_two_orbits_and_credits_no_antithetic_gain():
    """The whole-series Sokal tau of an alternating series is negative; the halves' tau is not."""
    rng = np.random.default_rng(0)
    n = 4000
    iid = rng.standard_normal(n)
    assert 0.7 * n < A._ess(iid) <= n  # halves' noise: tau ~ 1.0-1.2 (measured 3450)
    orbit = np.where(np.arange(n) % 2, -1.0, 1.0) + 0.01 * np.cumsum(rng.standard_normal(n))
    assert integrated_autocorr_time(orbit) < 0  # what the plain estimator would credit as n draws
    assert A._ess(orbit) < n / 50  # measured 12
    assert A._ess(np.where(np.arange(n) % 2, -1.0, 1.0)) == 0.0  # no drift at all: no information
    assert A._ess(np.array([1.0, np.inf, 2.0] * 100)) == 0.0  # a diverged chain
    ar = np.zeros(20_000)  # AR(1), rho 0.9: tau = 19; Sokal's relative error here ~14%
    noise = rng.standard_normal(len(ar))
    for i in range(1, len(ar)):
        ar[i] = 0.9 * ar[i - 1] + noise[i]
    assert 0.6 < A._ess(ar) / (len(ar) / 19) < 1.4  # ~3 sigma


def test_thinning_is_odd_so_a_period_two_orbit_is_seen_in_both_phases():
    assert [A.thinning(n) for n in (10, A.MAX_STORED, A.MAX_STORED + 1, 3 * A.MAX_STORED + 1)] == [1, 1, 3, 5]


def _smoke_args(tmp_path: Path, model: Path) -> list[str]:
    return ["--quick", "--seeds", "2", "--budget", "600", "--noise-steps", "200", "--dims", "30,12,10",
            "--sigmas", "0,3", "--model", str(model), "--lm-budget", "60", "--lm-samples", "2",
            "--lm-batch", "2", "--lm-seq", "32", "--lm-eval-windows", "4", "--lm-trial-steps", "3",
            "--lm-members", "2", "--lm-member-steps", "4", "--json", str(tmp_path / "bench.json")]


def test_smoke_every_part_respects_the_budgets(tmp_path, tiny_model_dir, capsys, one_thread):
    assert bench_samplers.main(_smoke_args(tmp_path, tiny_model_dir)) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    names = [t.name for t in A.make_targets(30, 12, 10)]

    for name in names:
        for s in A.SAMPLERS:
            r = result["analytic"][name][s]
            total = np.array(r["grads_tune"]) + np.array(r["grads_sample"])
            assert len(total) == 2 and (total <= 600).all() and (np.array(r["grads_tune"]) <= 120).all()
            # what is left unused: less than one trajectory (RT, HMC), one full step (MCLMC)
            unused = [t["n_leapfrog"] + 1 for t in r["tuned"]] if s in ("ray", "hmc") else \
                [3, 3] if s == "mclmc" else [0, 0]
            assert (total >= 600 - np.array(unused)).all(), (name, s, total)
            assert all(0 <= e <= 1 for e in r["ess_per_grad"]), (name, s)
            if s == "sgld":
                assert all(t["dt"] in A.SGLD_GRID for t in r["tuned"])
                assert all(t["passed"] == (abs(list(t["grid_bias_coord"].values())[-1]) < A.SGLD_MAX_BIAS)
                           for t in r["tuned"])
            assert f"| {name} | {s} |" in out
        assert set(result["noise"][name]) == set(A.SAMPLERS)
        assert set(result["noise"][name]["hmc"]["sigma"]) == {"0", "3"}

    lm = result["lm"]["results"]
    assert lm["start"]["mean_epistemic"] < 1e-6  # one model: no disagreement
    for name in ("ray", "hmc", "sgld", "mclmc", "mclmc-search", "mile", "smile", "psmile"):
        r = lm[name]
        assert r["samples"] == 2, name
        assert 58 <= r["grads_tune"] + r["grads_sample"] <= 60, name  # MCLMC: even sampling steps
        assert r["grads_tune"] <= 12, name
        assert math.isfinite(r["nll_bma"]) and 0 <= r["ece"] <= 1 and r["mean_epistemic"] >= 0, name
        assert r["nll_bma"] <= r["nll_single_mean"] + 1e-9, name  # log of a mean >= mean of logs
        assert 0 <= r["auroc_ood_epistemic"] <= 1 and r["mean_epistemic_ood"] >= 0, name
        assert r["grads_per_sample"] == (r["grads_tune"] + r["grads_sample"] + r.get("grads_members", 0)) / 2
        assert f"| {name} |" in out
    assert lm["mile"]["grads_members"] >= 2 and len(lm["mile"]["members"]) == 2
    assert lm["smile"]["grads_tune"] == 0  # no tuning: its controller adapts eps while it samples
    assert lm["psmile"]["grads_tune"] == 0 and lm["psmile"]["nll_bma"] != lm["smile"]["nll_bma"]
    deep = lm["deep-ensemble"]  # MILE's members alone
    assert deep["samples"] == 2 and deep["grads_members"] == lm["mile"]["grads_members"] and "| deep-ensemble |" in out
    for name in ("fiber-walk", "fiber-generated"):  # one walk of 60 gradients, two ensembles
        r = lm[name]
        assert r["grads_sample"] == 60 and 1 <= r["samples"] <= 2 and f"| {name} |" in out, name
        assert math.isfinite(r["nll_bma"]), name


@pytest.mark.parametrize("extra, message", [
    (["--budget", "10"], "--budget must be >= 600"),
    (["--parts", "noise"], "--parts noise needs analytic"),
    (["--dims", "10,10,9"], "the last even"),
    (["--parts", "lm", "--lm-budget", "5"], "--lm-budget 5 is too small"),
    (["--parts", "lm", "--model", "/nonexistent"], "holds no config.json"),
])
def test_bad_input_is_one_clear_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_samplers.parse_args(["--quick", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
