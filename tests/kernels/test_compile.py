"""The step kernels compiled for real GPU targets (sm_80, sm_89, sm_90) without a GPU.

Runs `python -m rtllm.kernels.compile_check --json` in a fresh process (the interpreter this
suite enables on CPU replaces the JIT at import, so compiling needs a process without it). Every
variant the backends launch must compile, keep everything in registers, and, for 16-byte aligned
shards (offset % 4 == 0, length a multiple of 16), load and store with 128-bit vector accesses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache

import pytest

pytest.importorskip("triton")
from rtllm.kernels import compile_check  # noqa: E402
from rtllm.kernels.compile_variants import VARIANTS  # noqa: E402

_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
_MISSING = subprocess.run(
    [sys.executable, "-c", "from rtllm.kernels.compile_check import backend_missing as m; print(m() or '')"],
    capture_output=True, text=True, env=_env,
).stdout.strip()
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"cannot compile for CUDA here: {_MISSING}")

# Registers per thread above which the occupancy of a memory-bound kernel starts to drop on
# sm_80..sm_90 (65536 registers per SM / 2048 threads = 32 would be full occupancy; 96 still
# gives 5 blocks of 128 threads per SM): a regression guard, not a target.
MAX_REGISTERS_ALIGNED = 96


@lru_cache(maxsize=1)
def compiled() -> list[dict]:
    """Every variant's figures for every target; one process per target, run concurrently."""
    procs = [subprocess.Popen([sys.executable, "-m", "rtllm.kernels.compile_check", "--json",
                               "--arch", str(arch), "--verify-sass", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env) for arch in compile_check.ARCHS]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def test_every_variant_compiles_for_every_target():
    got = {(row["arch"], row["variant"]) for row in compiled()}
    want = {(arch, name) for arch in compile_check.ARCHS for name in VARIANTS}
    assert want <= got, sorted(want - got)


def test_no_spills_and_bounded_registers():
    for row in compiled():
        assert row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
        if "misaligned" not in row["variant"]:
            assert 0 < row["registers"] <= MAX_REGISTERS_ALIGNED, row


def test_aligned_shards_use_vector_loads_and_stores():
    for row in compiled():
        if "misaligned" in row["variant"]:
            continue
        assert row["load_width"] >= 4, row  # ld.global.v4.b32 (16 bytes) or wider
        if row["kernel"] == "_fused_update_kernel":  # the reduce kernel stores 6 scalars
            assert row["store_width"] >= 4, row


def test_instruction_counts_equal_the_disassemblers():
    """The count read from the code words (opcode bits, NOPs left out) is cuobjdump's."""
    checked = {}
    for row in compiled():
        if "sass_instructions_disassembled" in row:
            assert row["sass_instructions"] == row["sass_instructions_disassembled"], row
            checked.setdefault(row["arch"], set()).add(row["kernel_hash"])
    assert {arch: len(hashes) for arch, hashes in checked.items()} == {arch: 2 for arch in compile_check.ARCHS}


def test_instructions_per_element_are_reported():
    rows = {(r["arch"], r["variant"]): r for r in compiled()}
    for arch in compile_check.ARCHS:
        noisy = rows[(arch, "reduce grad=fp32 noise")]["instructions_per_element"]
        quiet = rows[(arch, "reduce grad=fp32 no-noise")]["instructions_per_element"]
        assert 0 < quiet < noisy, (arch, quiet, noisy)  # the noise is what costs instructions
        # Philox + Box-Muller with polynomial cos/sin: ~70 per element (libdevice sin/cos: ~180)
        assert noisy - quiet < 100, (arch, quiet, noisy)
