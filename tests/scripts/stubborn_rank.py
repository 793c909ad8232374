"""A 2-rank job whose rank 1 ignores further SIGTERMs and never finishes its preemption save.

Usage: torchrun --nproc-per-node 2 stubborn_rank.py CKPT_DIR

It saves every 5 steps and prints ``step N`` lines. Once a stop signal has
been recorded, rank 1's registered object blocks in state_dict() during the
next save (the preemption save, or a periodic one that comes first), with
SIGTERM ignored, as a rank stuck in I/O would. Only SIGKILL ends it, and the
save it was part of must never be published.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import resilient

ckpt_dir = sys.argv[1]
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
sup: resilient.Supervisor


class Stuck:
    def state_dict(self) -> dict:
        if rank == 1 and sup.recorder.events:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"rank 1 blocks in its save of step {sup.trainer.step}", flush=True)
            while True:
                time.sleep(1)
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(8, 8))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
with resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=5, collective_timeout=300) as sup:
    sup.register(model=model, optimizer=optimizer, stateful={"stuck": Stuck()})
    for step in sup.steps(100_000):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}", flush=True)
        time.sleep(0.05)
