"""A 2-rank DDP job whose model has BatchNorm, so its running statistics differ per rank.

Usage: torchrun --nproc-per-node 2 batchnorm_job.py CKPT_DIR MAX_STEPS
Rank 0 prints each step; every rank prints its final digest, model buffers included.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import resilient

ckpt_dir, max_steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
torch.manual_seed(100 + rank)
try:
    with resilient.Supervisor(ckpt_dir=ckpt_dir) as sup:
        sup.register(model=model, optimizer=optimizer)
        for step in sup.steps(max_steps):
            # Different data per rank, so each rank's running statistics differ.
            inputs = torch.randn(16, 4) * (1 + rank)
            loss = (model(inputs) - inputs.sum(dim=1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rank == 0:
                print(f"step {step}", flush=True)
            time.sleep(0.1)
    # One write per line, so the two ranks' lines cannot interleave on the shared pipe.
    sys.stdout.write(f"rank {rank} digest={resilient.state_digest(model, optimizer)}\n")
    sys.stdout.flush()
finally:
    dist.destroy_process_group()
