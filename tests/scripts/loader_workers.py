"""One training process with DataLoader worker processes, printing each step and the final digest.

Usage: loader_workers.py CKPT_DIR MAX_STEPS PERSISTENT(0|1)
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import resilient

ckpt_dir, max_steps, persistent = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loader = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4, shuffle=True, num_workers=2,
                    persistent_workers=persistent)
with resilient.Supervisor(ckpt_dir=ckpt_dir) as sup:
    sup.register(model=model, optimizer=optimizer)
    for step, (batch,) in sup.train(loader, max_steps):
        loss = model(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}", flush=True)
        time.sleep(0.1)
print(f"final_state_digest={resilient.state_digest(model, optimizer)}", flush=True)
