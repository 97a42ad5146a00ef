"""`rtllm export`: the options, and the command that calls rtllm.store.export."""
from __future__ import annotations

import argparse
import sys


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="an ensemble directory (ensemble.json), any sample format")
    p.add_argument("out", help="new directory: one from_pretrained directory per sample + ensemble.json")
    p.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: safetensors from_pretrained directories (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def cmd_export(args: argparse.Namespace) -> int:
    from rtllm.store.export import export_hf

    manifest = export_hf(args.dir, args.out, overwrite=args.overwrite,
                         progress=lambda m: print(f"rtllm export: {m}", file=sys.stderr))
    print(f"wrote {manifest}")
    return 0
