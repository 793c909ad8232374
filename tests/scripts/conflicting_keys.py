"""A 2-rank job whose ranks register different models under the same parameter names.

This is the pipeline-parallel trap: each stage's local module names its
weights ``0.weight``... on every rank. Every rank prints the error its save raised.
Usage: torchrun --nproc-per-node 2 conflicting_keys.py CKPT_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import resilient

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # a different "stage" per rank
stage = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
optimizer = torch.optim.AdamW(stage.parameters())
try:
    with resilient.Supervisor(ckpt_dir=sys.argv[1], collective_timeout=30) as sup:
        sup.register(model=stage, optimizer=optimizer)
        for step in sup.steps(2):
            stage(torch.randn(3, 4)).sum().backward()
            optimizer.step()
except resilient.CheckpointError as err:
    sys.stdout.write(f"rank {rank} raised: {err}\n")
    sys.stdout.flush()
    sys.exit(3)
finally:
    dist.destroy_process_group()
