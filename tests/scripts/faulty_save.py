"""A small 2-rank training job whose save fails on one rank at a chosen step.

Usage: torchrun --nproc-per-node 2 faulty_save.py CKPT_DIR PHASE FAIL_STEP [async]

PHASE is ``prepare`` (a registered object's state_dict() raises), ``write``
(the DCP file writer raises ENOSPC, as on a full disk) or ``report``
(fsyncing the written files raises EIO). The failure happens on rank 1 only.
PHASE ``none`` injects nothing, for a disk that really fills up; the model is a
square linear layer of width FAULTY_SAVE_WIDTH (default 8), and each step sleeps
FAULTY_SAVE_STEP_SECONDS (default 0), both from the environment.
With ``async`` the periodic saves run in the background.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import resilient
import resilient.checkpoint.commit as commit

ckpt_dir, phase, fail_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
width = int(os.environ.get("FAULTY_SAVE_WIDTH", "8"))
step_seconds = float(os.environ.get("FAULTY_SAVE_STEP_SECONDS", "0"))
async_save = sys.argv[4:] == ["async"]
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
current_step = 0


class Counter:
    """A registered object whose state_dict() fails on rank 1 at the chosen step in the prepare phase."""

    def state_dict(self) -> dict:
        if phase == "prepare" and rank == 1 and current_step == fail_step:
            raise RuntimeError(f"injected failure in state_dict() at step {current_step}")
        return {"step": current_step}

    def load_state_dict(self, state: dict) -> None:
        pass


if rank == 1 and phase == "write":
    original_write = torch.distributed.checkpoint.FileSystemWriter.write_data

    def failing_write(self, plan, planner):
        # The staging directory names the step; a background save writes after training moved on.
        if f"step_{fail_step:09d}" in str(self.path):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original_write(self, plan, planner)

    torch.distributed.checkpoint.FileSystemWriter.write_data = failing_write

if rank == 1 and phase == "report":
    original_fsync = commit.fsync_file

    def failing_fsync(path):
        if f"step_{fail_step:09d}" in str(path):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return original_fsync(path)

    commit.fsync_file = failing_fsync

torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(width, width))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
started = time.monotonic()
try:
    with resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=3, collective_timeout=30,
                              async_save=async_save) as sup:
        sup.register(model=model, optimizer=optimizer, stateful={"counter": Counter()})
        for step in sup.steps(9):
            current_step = step
            loss = model(torch.randn(4, width)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            time.sleep(step_seconds)
except resilient.CheckpointError as err:
    print(f"rank {rank}: CheckpointError after {time.monotonic() - started:.1f} s: {err}", flush=True)
    sys.exit(3)
finally:
    dist.destroy_process_group()
