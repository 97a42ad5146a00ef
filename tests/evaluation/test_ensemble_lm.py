"""EnsembleForCausalLM: forward vs a naive average of softmax, KV caches, generate vs a loop."""
import pytest
import torch
from ensemble_fixtures import write_ensemble

import rtllm
from rtllm.store.ensemble import Ensemble

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=["safetensors", "delta8"])
def ensemble_dir(request, tiny_model_dir, tmp_path_factory):
    # scale 0.3: samples far enough apart that the BMA is not any one sample's distribution
    out = tmp_path_factory.mktemp("lm") / request.param
    write_ensemble(tiny_model_dir, out, n=3, scale=0.3, sample_format=request.param)
    return out


def naive_bma(ensemble_dir, ids, indices=None):
    """Each sample loaded as its own model; the plain average of their softmax, in float64."""
    ens = Ensemble(ensemble_dir)
    probs = []
    for i in indices if indices is not None else ens.indices:
        with torch.no_grad():
            probs.append(torch.softmax(ens.load_model(i).eval()(ids).logits.double(), -1))
    return torch.stack(probs)


def prompt(n=2, length=5, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def test_forward_is_the_log_of_the_average_softmax(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    ids = prompt()
    out = lm(ids, return_uncertainty=True)
    p = naive_bma(ensemble_dir, ids)
    bma = p.mean(0)
    torch.testing.assert_close(out.logits.exp().double(), bma, rtol=0, atol=1e-6)
    entropy = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    total, alea = entropy(bma), entropy(p).mean(0)
    torch.testing.assert_close(out.entropy_total.double(), total, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aleatoric.double(), alea, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.epistemic.double(), (total - alea).clamp_min(0), rtol=0, atol=1e-5)
    assert (out.epistemic > 1e-3).all()  # the samples disagree: there is something to see
    labels = ids
    nll = -bma[:, :-1].gather(-1, labels[:, 1:, None]).log().mean()
    assert lm(ids, labels=labels).loss.item() == pytest.approx(nll.item(), abs=1e-5)


def test_max_samples_takes_evenly_spaced_samples(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir, max_samples=2)
    assert len(lm) == 2
    ids = prompt(1)
    torch.testing.assert_close(lm(ids).logits.exp().double(), naive_bma(ensemble_dir, ids, [0, 2]).mean(0),
                               rtol=0, atol=1e-6)


def test_kv_cache_matches_a_full_forward(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    ids = prompt(length=8)
    full = lm(ids).logits
    first = lm(ids[:, :5], use_cache=True)
    assert len(first.past_key_values) == len(lm)
    rest = lm(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=0, atol=1e-5)


def test_greedy_generate_matches_a_hand_written_loop(ensemble_dir, transformers_warnings):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    ids = prompt()
    got = lm.generate(ids, max_new_tokens=6, return_dict_in_generate=True)
    assert not transformers_warnings  # transformers 5.25 warned of the old name of the cache
    seq = ids
    for _ in range(6):  # no cache, every sample recomputed from scratch: argmax of the BMA
        seq = torch.cat([seq, naive_bma(ensemble_dir, seq).mean(0)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got.sequences, seq)
    assert got.epistemic.shape == (2, 6) and (got.epistemic >= 0).all()
    assert torch.equal(lm.generate(ids, max_new_tokens=6), seq)


def test_sampling(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    ids = prompt()
    draw = lambda seed, **kw: lm.generate(  # noqa: E731
        ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(1), draw(1))  # seeded: reproducible
    assert not torch.equal(draw(1), draw(2))  # P(8 x 2 draws at ~uniform over 384 agree) ~ 0
    assert torch.equal(draw(3, top_k=1), lm.generate(ids, max_new_tokens=8))  # top-1 is greedy


def test_eos_stops_generation(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    ids = prompt(1)
    greedy = lm.generate(ids, max_new_tokens=4)
    eos = int(greedy[0, ids.shape[1] + 1])  # the second new token
    assert lm.generate(ids, max_new_tokens=4, eos_token_id=eos).shape[1] <= ids.shape[1] + 2
