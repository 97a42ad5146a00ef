"""The wait for the writer's last samples at the end of a run is a phase with its own progress."""
from __future__ import annotations

from types import SimpleNamespace

from rtllm.run.sampling import SamplingRun


class _SlowWriter:
    """`pending` drops by one every `polls_per_sample` reads, as a writer thread finishing."""

    def __init__(self, pending: int, polls_per_sample: int) -> None:
        self.reads, self.start, self.polls = 0, pending, polls_per_sample

    @property
    def pending(self) -> int:
        self.reads += 1
        return max(0, self.start - self.reads // self.polls)


def test_the_last_writes_are_shown_until_every_sample_is_on_disk(capsys):
    run = SimpleNamespace(writer=_SlowWriter(pending=2, polls_per_sample=3))
    SamplingRun._finish_writes(run, poll_s=0.001, quiet_s=0.0)
    out = capsys.readouterr()
    said = out.out + out.err
    assert run.writer.pending == 0
    assert "writing the last samples: 2/2 samples" in said, said


def test_a_short_wait_says_nothing(capsys):
    run = SimpleNamespace(writer=_SlowWriter(pending=1, polls_per_sample=2))
    SamplingRun._finish_writes(run, poll_s=0.001, quiet_s=5.0)
    out = capsys.readouterr()
    assert out.out + out.err == ""
    assert run.writer.pending == 0
