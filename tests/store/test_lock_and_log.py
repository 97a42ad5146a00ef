"""The output directory's lock, the torn-line-tolerant run log, disk messages that tell sizes apart."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from rtllm.store.lock import LOCK_FILE, DirectoryLock, DirectoryLocked
from rtllm.store.manifest import distinct_gb
from rtllm.store.runlog import RunLog, read_log


def test_a_second_lock_is_refused_and_the_first_release_frees_it(tmp_path):
    first = DirectoryLock(tmp_path)
    with pytest.raises(DirectoryLocked, match=r"in use by another rtllm run \(PID \d+\)"):
        DirectoryLock(tmp_path)
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    DirectoryLock(tmp_path).release()


def test_kill_9_of_the_holder_frees_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rtllm.store.lock import DirectoryLock; "
         "lock = DirectoryLock(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryLocked, match=f"PID {holder.pid}"):
        DirectoryLock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays behind, the lock does not
    DirectoryLock(tmp_path).release()


def test_a_torn_last_line_is_skipped_with_a_warning_and_cut_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"type": "step", "step": 0}) + "\n" + '{"type": "st')
    with pytest.warns(UserWarning, match="torn last line 2"):
        assert read_log(path) == [{"type": "step", "step": 0}]
    log = RunLog(path)
    log.write({"type": "step", "step": 1})
    log.close()
    assert [r["step"] for r in read_log(path)] == [0, 1]


def test_a_broken_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{broken\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_log(path)


@pytest.mark.parametrize("need, free", [(10_000_000, 9_000_000), (12_345_678_901, 12_345_600_000),
                                        (5_000_000_000, 1_000_000_000)])
def test_disk_sizes_are_printed_with_enough_digits_to_differ(need, free):
    a, b = distinct_gb(need, free)
    assert a != b and len(a.split(".")[1]) >= 2
