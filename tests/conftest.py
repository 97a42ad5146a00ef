import os

import torch

# The Triton interpreter must be chosen before any kernel module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tiny_gpt2 import tiny_model_dir  # noqa: E402,F401  (registers the session fixture)
