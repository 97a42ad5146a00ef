"""scripts/bench_feature_variants.py (issue 17): the variants score what the shipped score reads."""
import sys

import pytest
import torch

from repo_paths import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import bench_feature_variants as V  # noqa: E402

from rtllm.evaluation import feature_distance as fd  # noqa: E402


def test_full_covariance_distance_is_one_on_average_for_the_reference_distribution():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)  # correlated dimensions
    draw = lambda n: torch.randn(n, 8, generator=g, dtype=torch.float64) @ mix + 3.0  # noqa: E731
    reference, same, shifted = draw(20_000), draw(4_000), draw(4_000) + 3 * mix[0]
    assert V.shrunk_distances(reference, same, 0.0).mean() == pytest.approx(1.0, abs=0.05)
    # three standard deviations along one direction: + 3^2 / 8 dimensions
    assert V.shrunk_distances(reference, shifted, 0.0).mean() == pytest.approx(1.0 + 9 / 8, abs=0.1)


def test_the_last_block_features_are_the_shipped_scores_features(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    windows = torch.randint(model.config.vocab_size, (5, 17), generator=torch.Generator().manual_seed(1))
    feats = V.block_features(model, windows)
    assert feats.shape == (model.config.n_layer + 1, 5, model.config.n_embd)
    torch.testing.assert_close(feats[-1], fd.window_features(model, windows, torch.device("cpu")),
                               rtol=1e-6, atol=1e-6)
