"""A 2-rank job whose only collective per step is resilient's stop agreement.

Usage: torchrun --nproc-per-node 2 frozen_rank.py CKPT_DIR COLLECTIVE_TIMEOUT

Each rank trains the same copy of a small model (no DDP, so no gradient
all-reduce), saves every 5 steps and prints ``rank R step N`` lines. A test
freezes one rank with SIGSTOP and sends SIGTERM to the other, which then waits
in the agreement for a rank that does not respond. The error that ends a rank is
printed as ``rank R: TYPE after S s: MESSAGE``, S counted from the first stop
signal this rank recorded.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.distributed as dist

import resilient

ckpt_dir, timeout = sys.argv[1], float(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same weights on both ranks, as replicated training keeps them
model = torch.nn.Linear(8, 8)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
sup = resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=5, collective_timeout=timeout)
try:
    with sup:
        sup.register(model=model, optimizer=optimizer)
        for step in sup.steps(100_000):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"rank {rank} step {step}", flush=True)
            time.sleep(0.05)
except BaseException as err:  # noqa: BLE001 - the test reads how the rank ended
    first = min((event.monotonic for event in sup.recorder.events), default=None)
    since = f"{time.monotonic() - first:.1f}" if first is not None else "?"
    print(f"rank {rank}: {type(err).__name__} after {since} s: {str(err).splitlines()[0] if str(err) else ''}",
          flush=True)
    sys.exit(3)
