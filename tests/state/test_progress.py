"""Progress: a line every ~10 s with the time left when not on a terminal, a bar on one."""
import io

import pytest

from rtllm.state.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_off_a_terminal_a_line_every_10_s_with_the_time_left_and_a_last_line():
    out, clock = io.StringIO(), Clock()
    with Progress(100, "sampling", stream=out, clock=clock, is_terminal=False) as bar:
        for _ in range(100):
            clock.now += 1.0  # one step a second: 100 s in all
            bar.update(1, loss=3.25)
    lines = out.getvalue().splitlines()
    assert len(lines) == 9 + 1, lines  # at 10, 20, ..., 90 s, and the last line at 100 s
    assert lines[0] == "sampling: 10/100 steps (10%), 10 s elapsed, about 1 min 30 s left, loss 3.25"
    assert lines[-1] == "sampling: 100/100 steps (100%), 1 min 40 s elapsed, loss 3.25"


def test_a_resumed_phase_estimates_from_its_own_rate():
    out, clock = io.StringIO(), Clock()
    bar = Progress(100, "sampling", initial=50, stream=out, clock=clock, is_terminal=False)
    clock.now += 10.0
    bar.update(5)  # 5 steps in 10 s: 45 steps left take 90 s
    assert bar.eta_s() == pytest.approx(90.0)
    assert "55/100" in out.getvalue() and "about 1 min 30 s left" in out.getvalue()


def test_nothing_printed_when_disabled_or_when_no_work_was_done():
    out, clock = io.StringIO(), Clock()
    with Progress(10, "x", stream=out, clock=clock, enabled=False, is_terminal=False) as bar:
        clock.now += 60
        bar.update(10)
    with Progress(10, "already done", initial=10, stream=out, clock=clock, is_terminal=False):
        pass
    assert out.getvalue() == ""


def test_on_a_terminal_a_tqdm_bar():
    out = io.StringIO()
    with Progress(4, "evaluate", unit="pass", stream=out, is_terminal=True) as bar:
        bar.update(4, nll=1.5)
    assert "evaluate" in out.getvalue() and "4/4" in out.getvalue()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")
    with pytest.raises(ValueError, match="every_s"):
        Progress(1, "x", every_s=0)
