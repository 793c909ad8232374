"""A 2-rank job where only rank 0 requests time-based saves; both must save the same steps.

Usage: torchrun --nproc-per-node 2 schedule_ranks.py CKPT_DIR STEPS

Rank 0 has ``save_interval=0.3`` and rank 1 none. The agreement gives every
rank rank 0's wish, so both join each save; if they did not, the save's
collectives would not match and the job would fail or time out.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import resilient

ckpt_dir, steps = sys.argv[1], int(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(8, 8))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
interval = 0.3 if rank == 0 else None
with resilient.Supervisor(ckpt_dir=ckpt_dir, save_interval=interval, keep=100, collective_timeout=60,
                          deadline=None) as sup:
    sup.register(model=model, optimizer=optimizer)
    for step in sup.steps(steps):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(0.05)
print(f"rank {rank} done", flush=True)
dist.destroy_process_group()
