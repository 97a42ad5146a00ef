"""Several `rtllm sample` command lines in one torchrun launch (the same processes, one after another).

Usage: python -m torch.distributed.run --nproc-per-node W sharded_launcher.py '[["sample", ...], ...]'
"{RANK}" in an argument becomes the rank (a launch whose ranks get other settings, on purpose).
The process group is set up once here (run_sharded then uses it and leaves it open); as each
command line ends, each rank prints `rank R: command K exit code C`. Process start and the
imports are most of a launch of the tiny model, so one launch serves several checks.
"""
import json
import os
import sys

import torch.distributed as dist

from rtllm.cli import main

dist.init_process_group("gloo")
rank = os.environ["RANK"]
for k, argv in enumerate(json.loads(sys.argv[1])):
    code = main([a.replace("{RANK}", rank) for a in argv])
    # one write (atomic on a pipe): print() writes the text and its newline apart, and another
    # rank's line could land between them
    sys.stdout.write(f"\nrank {rank}: command {k} exit code {code}\n")
    sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
