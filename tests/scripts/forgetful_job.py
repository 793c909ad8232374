"""A single-process training job that does not resume exactly, for ``resilient chaos`` to catch.

Usage: python forgetful_job.py CKPT_DIR MAX_STEPS

The model and optimizer are registered with the Supervisor, but the inputs
come from a generator that is seeded at start and never saved. After a
resume the data stream starts over, so the final state differs from an
uninterrupted run's. Every step sleeps briefly so that kills land mid-run.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

import resilient

ckpt_dir, max_steps = sys.argv[1], int(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
data = torch.Generator().manual_seed(1)  # the bug: this generator's state is not part of any checkpoint

with resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=3) as sup:
    sup.register(model=model, optimizer=optimizer)
    for step in sup.steps(max_steps):
        inputs = torch.randn(16, 8, generator=data)
        loss = (model(inputs) - inputs.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item():.4f}", flush=True)
        time.sleep(0.05)

print(f"final_state_digest={resilient.state_digest(model, optimizer)}", flush=True)
