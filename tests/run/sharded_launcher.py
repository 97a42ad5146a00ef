"""Several `rtllm sample` command lines in one torchrun launch (the same processes, one after another).

Usage: python -m torch.distributed.run --nproc-per-node W sharded_launcher.py '[["sample", ...], ...]'
The process group is set up once here (run_sharded then uses it and leaves it open); each rank
prints `rank R: exit codes [...]`, what each command returned. Process start and the imports are
most of a launch of the tiny model, so one launch serves several checks.
"""
import json
import os
import sys

import torch.distributed as dist

from rtllm.cli import main

dist.init_process_group("gloo")
codes = [main(argv) for argv in json.loads(sys.argv[1])]
dist.barrier()
dist.destroy_process_group()
print(f"rank {os.environ['RANK']}: exit codes {json.dumps(codes)}", flush=True)
