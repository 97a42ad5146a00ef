"""SIGINT and SIGTERM during a run: stop at a safe point, say how to continue, exit 130 / 143.

While the sampling loop runs, the first SIGINT or SIGTERM only sets a flag; the loop checks it
once per step, writes a checkpoint and raises `Stopped`, which the CLI turns into one line with
the resume command. A second signal stops at once (`Interrupted`): the last checkpoint is still
intact, so `--resume` continues from there. Outside the loop (loading the model, writing the
evaluation) the CLI treats both signals as `Interrupted` straight away.
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from pathlib import Path
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the process where it was, not at a safe point."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stopped(Exception):
    """The run stopped at a safe point after a signal; its checkpoint is written."""

    def __init__(self, signum: int, step: int, out_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; the checkpoint "
                         f"in {out_dir} is written")
        self.signum, self.step, self.out_dir = signum, step, out_dir


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While inside, SIGTERM (like SIGINT) raises `Interrupted`, so the CLI can answer it with
    one line; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_command(argv: list[str]) -> str:
    """The command line that continues a stopped `rtllm sample` (or `mile`) run."""
    kept = [a for a in argv if a != "--overwrite"]
    return shlex.join(["rtllm", *kept, *([] if "--resume" in kept else ["--resume"])])


class SafeStop:
    """The flag the loop checks: `requested` is the first signal received (0 for none)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: the user does not want to wait
            raise Interrupted(signum)
        self.signum = signum

    def stop_now(self, step: int) -> None:
        raise Stopped(self.signum, step, self.out_dir)


@contextlib.contextmanager
def stop_on_signals(out_dir: Path) -> Iterator[SafeStop]:
    """While inside, SIGINT/SIGTERM request a safe stop; the previous handlers come back after.
    Off the main thread (where Python delivers no signals) the flag simply stays unset."""
    stop = SafeStop(out_dir)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
