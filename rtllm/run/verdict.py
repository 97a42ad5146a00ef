"""The stationarity verdict `rtllm sample` ends with, from the chain's own run log."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from rtllm.samplers.stationarity import StationarityVerdict, stationarity_verdict
from rtllm.store.log_series import stationarity_inputs
from rtllm.store.runlog import RunLog, read_log


def chain_verdict(log_path: Path) -> StationarityVerdict:
    """The verdict of one chain (rtllm.samplers.stationarity) over its sampling phase."""
    return stationarity_verdict(**stationarity_inputs([read_log(log_path)]))


def report_verdict(log: RunLog, say: Callable[[str], None]) -> StationarityVerdict:
    """The end of `rtllm sample`: the chain's verdict, written to its log and said."""
    verdict = chain_verdict(log.path)
    log.write({"type": "stationarity", **verdict.to_json()})
    say(verdict.message)
    return verdict
