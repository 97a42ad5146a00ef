"""Compile the step kernels for real GPU targets on a machine without a GPU, and read the code.

Triton compiles to PTX and a cubin with the ptxas bundled in its wheel; only the *active driver*
needs a GPU. `compile_only(arch)` swaps in a driver that reports `GPUTarget("cuda", arch, 32)`
and turns every launch into a compile-only warm-up (`JITFunction.run(..., warmup=True)`), so the
project's real launchers (`triton_step.reduce_sums`, `fused_update_`) can be called on CPU
tensors and compile exactly the specialization a GPU launch would (integer widths, 16-byte
pointer alignment, divisibility, constexprs, num_warps). `figures()` reads registers and spills
(ptxas -v), vector widths of global loads/stores (PTX) and instruction counts (SASS).

Run in a process where TRITON_INTERPRET is unset (the interpreter replaces the JIT functions at
import time): `python -m rtllm.kernels.compile_check --json` or `scripts/kernel_report.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import launch_mode

ARCHS = (80, 89, 90)  # A100, L4/RTX 40xx, H100/H200
def backend_missing() -> str | None:
    """Why kernels cannot be compiled for CUDA here, or None when they can."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        return "TRITON_INTERPRET is set: the interpreter replaces the JIT; run in a fresh process"
    try:
        import triton.backends as backends
    except ImportError:
        return "triton is not installed"
    if "nvidia" not in backends.backends:
        return "the installed triton has no CUDA (nvidia) backend"
    if _tool("ptxas") is None:
        return "the installed triton has no bundled ptxas"
    return None


def _tool(name: str) -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() else None


class _CompileOnlyDriver:
    """Just enough of a CUDA driver for `JITFunction.run(warmup=True)` to pick a target."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return 1000 + self.arch  # a per-target key of the JIT's per-device kernel caches

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list]:
    """Within: Triton launches compile for sm_<arch> and do not run; yields the compiled kernels."""
    reason = backend_missing()
    if reason:
        raise RuntimeError(f"cannot compile for CUDA here: {reason}")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: list = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    launch_mode.set_compile_only(True)
    try:
        yield compiled
    finally:
        launch_mode.set_compile_only(False)
        JITFunction.run = original_run
        driver.reset_active() if driver._default is not None else driver.set_active(None)


@dataclass(frozen=True)
class KernelFigures:
    """What the compiled code of one kernel variant says (per target)."""

    variant: str
    kernel: str
    kernel_hash: str  # Triton's hash of the compiled kernel (variants can share one)
    arch: int
    registers: int
    spill_bytes: int  # local-memory spill stores + loads reported by ptxas (must be 0)
    local_bytes: int  # per-thread stack frame reported by ptxas
    load_width: int  # widest global load, in 32-bit words per instruction (4 = ld.global.v4)
    store_width: int
    global_loads: int  # ld.global instructions in the PTX
    global_stores: int
    sass_instructions: int  # static count in the SASS, the whole kernel
    elements: int  # elements one program covers (BLOCK)
    threads: int
    sass_instructions_disassembled: int | None = None  # cuobjdump's count, where it was checked

    @property
    def instructions_per_element(self) -> float:
        """Static SASS instructions each thread executes per element it owns (no loops)."""
        return self.sass_instructions / (self.elements / self.threads)


_LD = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\b")


def _widths(ptx: str, op: str) -> tuple[int, int]:
    """(instruction count, widest access in 32-bit words) of ld.global or st.global in `ptx`."""
    count, widest = 0, 0
    for line in ptx.splitlines():
        line = line.strip()
        if not line.startswith((op + ".global", "@")) or (op + ".global") not in line:
            continue
        m = _LD.search(line)
        if not m or m.group(1) != op:
            continue
        lanes, bits = int(m.group(2) or 1), int(m.group(3))
        count += 1
        widest = max(widest, lanes * bits // 32)
    return count, widest


def _ptxas_info(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store + load bytes, stack bytes) from `ptxas -v`, the ptxas Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    registers = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    return (int(registers.group(1)) if registers else -1, sum(map(int, spills)),
            int(stack.group(1)) if stack else -1)


# SASS since Volta is a fixed 128-bit encoding with the opcode in the low 12 bits; NOP is 0x918.
# Counting the cubin's code words needs no disassembler (cuobjdump -sass took ~0.7 s per kernel,
# 80% of the whole compile check); tests/kernels/test_compile.py checks the count against it.
_SASS_WORD = 16
_NOP_OPCODE = 0x918


def _elf_sections(elf: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file (a cubin)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, offset, size in headers:
        end = elf.index(b"\0", names_at + name)
        out[elf[names_at + name:end].decode()] = elf[offset:offset + size]
    return out


def _sass_instructions(cubin: bytes) -> int:
    """Static SASS instructions of the kernel code in `cubin`, NOPs (alignment padding) excluded."""
    count = 0
    for name, code in _elf_sections(cubin).items():
        if name.startswith(".text."):
            count += sum(1 for i in range(0, len(code), _SASS_WORD)
                         if int.from_bytes(code[i:i + 2], "little") & 0xFFF != _NOP_OPCODE)
    return count


def sass_instructions_disassembled(cubin: bytes) -> int:
    """The same count read from cuobjdump's disassembly (slow; the check of `_sass_instructions`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_tool("cuobjdump")), "-sass", f.name],
                             capture_output=True, text=True, check=True).stdout
    # One instruction per line like "        /*0040*/                   IMAD.MOV.U32 R1, ...;"
    return sum(1 for line in out.splitlines()
               if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+[A-Z@]", line) and "NOP" not in line)


_FIGURES: dict[tuple[str, int], dict] = {}  # kernel hash, arch -> figures (variants share kernels)


def figures(kernel, variant: str, disassemble: bool = False) -> KernelFigures:
    """Read one compiled kernel's code (registers, spills, vector widths, instruction counts);
    `disassemble`: also count its instructions in cuobjdump's disassembly (~0.7 s)."""
    arch = int(kernel.metadata.target.arch)
    key = (kernel.metadata.hash, arch)
    if key not in _FIGURES:
        ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
        registers, spill, stack = _ptxas_info(ptx, arch)
        loads, load_width = _widths(ptx, "ld")
        stores, store_width = _widths(ptx, "st")
        _FIGURES[key] = dict(
            kernel=kernel.metadata.name, kernel_hash=kernel.metadata.hash, arch=arch,
            registers=registers, spill_bytes=spill, local_bytes=stack, load_width=load_width,
            store_width=store_width, global_loads=loads, global_stores=stores,
            sass_instructions=_sass_instructions(cubin), elements=_block(),
            threads=int(kernel.metadata.num_warps) * 32,
        )
    if disassemble and "sass_instructions_disassembled" not in _FIGURES[key]:
        _FIGURES[key]["sass_instructions_disassembled"] = sass_instructions_disassembled(kernel.asm["cubin"])
    return KernelFigures(variant=variant, **_FIGURES[key])


def _block() -> int:
    from . import triton_step

    return triton_step.BLOCK


def compile_variants(arch: int, verify_sass: int = 0) -> list[KernelFigures]:
    """Compile every variant the backends launch for sm_<arch>, through the real launchers.

    `verify_sass`: for the first that many distinct kernels, also count the instructions in
    cuobjdump's disassembly, to check the encoding-based count."""
    from .compile_variants import VARIANTS

    out, checked = [], set()
    with compile_only(arch) as compiled:
        for name, launch in VARIANTS.items():
            start = len(compiled)
            launch()
            for kernel in compiled[start:]:
                if len(checked) < verify_sass:
                    checked.add(kernel.metadata.hash)
                out.append(figures(kernel, name, disassemble=kernel.metadata.hash in checked))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 "
                        f"(repeatable; default {', '.join(map(str, ARCHS))})")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel variant")
    parser.add_argument("--verify-sass", type=int, default=0, metavar="N", help="for the first N "
                        "distinct kernels per target, also count instructions in cuobjdump's "
                        "disassembly (sass_instructions_disassembled; ~0.7 s each)")
    args = parser.parse_args(argv)
    reason = backend_missing()
    if reason:
        print(f"cannot compile for CUDA here: {reason}", file=sys.stderr)
        return 2
    for arch in args.arch or ARCHS:
        for fig in compile_variants(arch, verify_sass=args.verify_sass):
            row = asdict(fig) | {"instructions_per_element": round(fig.instructions_per_element, 1)}
            if row["sass_instructions_disassembled"] is None:  # not checked: no key
                del row["sass_instructions_disassembled"]
            print(json.dumps(row) if args.json else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
