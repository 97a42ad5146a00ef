"""Whether Triton launches run or only compile (set by compile_check.compile_only, read by the
launchers, which then accept CPU tensors: nothing runs, only the specialization matters)."""
from __future__ import annotations

_compile_only = False


def compile_only_active() -> bool:
    return _compile_only


def set_compile_only(active: bool) -> None:
    global _compile_only
    _compile_only = bool(active)
