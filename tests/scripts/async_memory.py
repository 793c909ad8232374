"""One process, many background saves of a 64 MB state: report staging and resident memory.

Usage: python async_memory.py CKPT_DIR SAVES

Prints ``key=value`` lines: the state size, the staging buffers' size and
total allocations, and the resident set size after the 3rd and the last save.
"""

from __future__ import annotations

import sys

import psutil
import torch

import resilient
from resilient.journal import read_journal

ckpt_dir, saves = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
process = psutil.Process()
rss: dict[int, int] = {}

with resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=1, keep=2, async_save=True, deadline=None) as sup:
    sup.register(model=model, optimizer=optimizer)
    for step in sup.steps(saves + 1):
        loss = model(torch.randn(4, 1024)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (4, saves + 1):
            # The saves of steps 3 and ``saves`` were started after the previous steps; finish them first.
            sup.wait_for_save()
            rss[step - 1] = process.memory_info().rss
    buffers = sup._background.buffers  # test-only look inside

print(f"state_bytes={state_bytes}")
periodic = [event for event in read_journal(ckpt_dir).events
            if event.get("event") == "checkpoint" and event.get("reason") == "periodic"]
print(f"saves={len(periodic)}")
print(f"staging_bytes={buffers.nbytes}")
print(f"staging_allocated={buffers.allocated_bytes}")
print(f"rss_after_third={rss[3]}")
print(f"rss_after_last={rss[saves]}")
