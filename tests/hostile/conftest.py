"""The one real run the hostile-input tests share (they copy it before changing anything)."""
from __future__ import annotations

from pathlib import Path

import pytest

from refusal import run_config
from rtllm.run.sampling import sample


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, train_file, tmp_path_factory) -> Path:
    """A complete tiny run (2 samples, checkpoint at the last step); copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    sample(run_config(tiny_model_dir, train_file, out), log=lambda _: None)
    return out
