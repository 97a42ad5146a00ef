"""`python -m rtllm.cli ...` (what torchrun launches) is the `rtllm` command."""
import sys

from rtllm.cli import main

sys.exit(main())
