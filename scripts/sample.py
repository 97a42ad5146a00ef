"""Thin wrapper: `python scripts/sample.py ARGS` == `rtllm sample ARGS` (see `--help`)."""
import sys

from rtllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
