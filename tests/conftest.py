import os

import torch

# The Triton interpreter must be chosen before any kernel module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command runs one worker per core) each worker, and every
# process it starts, uses one torch thread: two workers of two threads each on two cores contend
# (OpenMP threads spin while waiting), which made single tests 10-25x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tiny_gpt2 import tiny_model_dir, train_file, trained_tiny_model_dir  # noqa: E402,F401  (session fixtures)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is fastest, and on a busy 2-core machine two threads
    contend badly (measured: a sum over [128, 1000] float64 took 23 ms with 2 threads under
    load, 0.16 ms with 1). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def transformers_warnings():
    """What transformers' logger says during a test (its messages, in order). warning_once
    remembers what it said in this process: it is made to forget, so the test can hear it."""
    import logging

    import transformers.utils.logging as hf_logging

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    hf_logging.warning_once.cache_clear()
    hf_logging.add_handler(handler)
    yield said
    hf_logging.remove_handler(handler)


@pytest.fixture
def crash_on_call(monkeypatch):
    """crash_on_call(cls, name, n): from now, the n-th call of cls.name raises
    RuntimeError("simulated crash"), as a crash mid-run would; returns what puts it back."""
    def arm(cls, name: str, n: int):
        original, calls = getattr(cls, name), []

        def dying(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("simulated crash")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, dying)
        return lambda: monkeypatch.setattr(cls, name, original)
    return arm
