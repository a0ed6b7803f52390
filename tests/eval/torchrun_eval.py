"""Run several `fastsamclip eval` commands in one torchrun launch (one process group for all).

    python -m torch.distributed.run --nproc_per_node 2 tests/eval/torchrun_eval.py COMMANDS.json OUT.json

COMMANDS.json: a list of argv lists; OUT.json gets, per rank, the exit code of each command
(OUT.json.rank<r>). Used by test_distributed.py.
"""

import json
import os
import sys

import torch.distributed as dist

from fastsamclip.cli import main

if __name__ == "__main__":
    commands, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    codes = [main(argv) for argv in json.load(open(commands))]
    with open(f"{out}.rank{os.environ['RANK']}", "w") as f:
        json.dump(codes, f)
    dist.destroy_process_group()
