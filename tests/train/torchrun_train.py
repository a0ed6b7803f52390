"""One training run from a JSON config, on one process or under torchrun; every rank saves its
final weights to OUT/rank{R}.pt (for the one-process-equals-N-processes test)."""

import json
import os
import sys

import torch

from fastsamclip.train import Distiller, TrainConfig

if __name__ == "__main__":
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    trainer = Distiller(cfg)
    trainer.run()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({k: v.detach().cpu() for k, v in trainer.student.state_dict().items()},
               os.path.join(cfg.out, f"rank{rank}.pt"))
