"""Marker for tests that run CPU models with backend="triton".

They need the Triton interpreter, which tests/conftest.py turns on only where CUDA is absent
(triton chooses compile vs interpret at import). On a GPU host they are skipped; the kernels are
tested there on CUDA tensors (tests/kernels, tests/state/test_segment_launch.py).
"""
import os

import pytest

triton_on_cpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors with backend='triton' need TRITON_INTERPRET=1 (conftest sets it only "
           "where CUDA is absent); the GPU runs the kernels on CUDA tensors instead")
