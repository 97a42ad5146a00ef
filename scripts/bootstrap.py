"""One-command set-up: make .venv, install rtllm with its test extras, then run a job.

    python3 scripts/bootstrap.py test   [pytest args...]   # set up, then run the test suite (--durations=15, a worker per core)
    python3 scripts/bootstrap.py test -m slow              # the long statistical tests and the full demo
    python3 scripts/bootstrap.py demo   [demo args...]     # set up, then run the built-in demo

Needs only Python >= 3.10. Re-running is cheap: an existing .venv is reused.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


# pip byte-compiles every module of torch and transformers (~40 s of a ~90 s set-up); skip that and
# let Python cache the bytecode of what a job actually imports, in .venv, as it imports it: even
# where the environment turned caching off, since .venv is ours.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _run(cmd: list[str], **kw) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], env=ENV, **kw)


def _pip(*args: str) -> int:
    return _run([PY, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile", "-q", *args])


def _has_torch() -> bool:
    return subprocess.call([str(PY), "-c", "import torch"], stderr=subprocess.DEVNULL, env=ENV) == 0


def setup() -> None:
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not _has_torch():
        # Without an NVIDIA driver prefer a CPU build of torch (small; found where the package
        # index serves one); otherwise, or if none is served, take the default build.
        cpu_only = shutil.which("nvidia-smi") is None
        if not (cpu_only and _pip("torch==2.13.0+cpu") == 0) and _pip("torch>=2.4") != 0:
            sys.exit("could not install torch: see the pip output above")
    fast = _build_isolation()
    if _pip(*fast, "-e", f"{ROOT}[test]") != 0 and (not fast or _pip("-e", f"{ROOT}[test]") != 0):
        sys.exit("could not install rtllm: see the pip output above")


PARALLEL = ("--numprocesses=auto", "--maxprocesses=4", "--dist=loadscope")


def _build_isolation() -> tuple[str, ...]:
    """("--no-build-isolation",) when .venv's own setuptools can build the editable install
    (>= 70.1 needs no `wheel`; Python < 3.12 puts one in every venv): pip otherwise installs
    setuptools into a throw-away build environment first (12 s of a ~60 s set-up, measured)."""
    probe = ("import sys, setuptools; v = tuple(int(x) for x in setuptools.__version__.split('.')[:2]); "
             "sys.exit(v < (70, 1))")
    ok = subprocess.call([str(PY), "-c", probe], stderr=subprocess.DEVNULL, env=ENV) == 0
    return ("--no-build-isolation",) if ok else ()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("test", "demo"):
        print(__doc__)
        return 2
    setup()
    job, rest = argv[0], argv[1:]
    if job == "test":
        # The pytest launcher (not `python -m pytest`) keeps the repository root off sys.path,
        # so the installed package is what gets imported.
        # --durations=15: the slowest tests are always in view, so a slow one is noticed.
        # pytest-xdist: one worker per core (at most 4), each test file on one worker (its module
        # fixtures built once); the workers use one torch thread each (tests/conftest.py). On 2
        # cores this takes ~0.6x the time of one process (docs/benchmarks.md, issue 16).
        return _run([BIN / "pytest", "--durations=15", *PARALLEL, *rest], cwd=ROOT)
    return _run([BIN / "rtllm", "demo", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
