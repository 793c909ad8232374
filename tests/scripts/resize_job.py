"""A DDP job over a dataset of sample indices, for resuming at another world size.

Usage: torchrun --nproc-per-node W resize_job.py CKPT_DIR MAX_STEPS SEEN_DIR [STOP_AT]

Every rank appends "epoch index" lines for each sample it trains on to
SEEN_DIR/seen.<pid>. With STOP_AT, rank 0 sends itself SIGTERM after that
step. At the end every rank prints its model and optimizer digest.
RESIZE_SAMPLER=plain uses torch's DistributedSampler instead of
resilient.ResumableSampler; RESIZE_DATA_ON_RESIZE sets Config.data_on_resize.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import resilient

ckpt_dir, max_steps, seen_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()


class Indices(Dataset):
    def __len__(self) -> int:
        return 96

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
sampler_type = DistributedSampler if os.environ.get("RESIZE_SAMPLER") == "plain" else resilient.ResumableSampler
sampler = sampler_type(Indices(), shuffle=True, seed=7, drop_last=True)
loader = DataLoader(Indices(), batch_size=2, sampler=sampler, drop_last=True)
seen = open(seen_dir / f"seen.{os.getpid()}", "a")
try:
    data_on_resize = os.environ.get("RESIZE_DATA_ON_RESIZE", "error")
    with resilient.Supervisor(ckpt_dir=ckpt_dir, collective_timeout=60, data_on_resize=data_on_resize) as sup:
        sup.register(model=model, optimizer=optimizer)
        for step, indices in sup.train(loader, max_steps):
            features = torch.stack([torch.full((4,), float(index)) for index in indices]) / 96
            loss = model(features).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.write("".join(f"{sup.trainer.epoch} {int(index)}\n" for index in indices))
            seen.flush()
            if rank == 0 and step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
    sys.stdout.write(f"rank {rank} digest={resilient.state_digest(model, optimizer)}\n")
    sys.stdout.flush()
finally:
    dist.destroy_process_group()
