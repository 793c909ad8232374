"""A 2-rank job that saves after every step until it is killed, for the random-kill test.

Usage: torchrun --nproc-per-node 2 torture_job.py CKPT_DIR KEEP MAX_STEPS

Every rank trains the same tiny model with Adam on the same batches, which are
drawn from a generator seeded with the step number. The model and optimizer
state are therefore replicated, and DCP stores them once. Each rank also
draws from its global torch RNG (seeded per rank) in every step and adds the
draws to a registered per-rank ``Tally``. The whole state after step N is a
function of N and the rank.

Each rank prints ``torture-pid rank R pid P`` at start. In the first step
after the resume it rebuilds the state of step N from scratch and prints
``torture-resume rank R step N ok``, or ``... mismatch: <what differs>`` and
exits with status 4. N is 0 when there was no checkpoint. The replay took
about 0.4 ms per step on one idle core, so it stays short for the few
thousand steps a long test run reaches.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

import resilient

ckpt_dir, keep, max_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()


def say(line: str) -> None:
    # One write per line, so the two ranks' lines cannot interleave on the shared pipe.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


say(f"torture-pid rank {rank} pid {os.getpid()}")

RNG_SEED = 1000


class Tally:
    """Per-rank state: the sum of this rank's global RNG draws and the step it was last updated at."""

    def __init__(self) -> None:
        self.step = 0
        self.total = 0.0

    def state_dict(self) -> dict:
        return {"rank": rank, "step": self.step, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != rank:
            raise ValueError(f"rank {rank} was given the tally of rank {state['rank']}")
        self.step, self.total = state["step"], state["total"]


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # Creating the layers draws from the global RNG, which the replay must leave as training left it.
    with torch.random.fork_rng(devices=[]):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        init = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=init) * 0.3)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tally: Tally, step: int,
               rng: torch.Generator | None) -> None:
    """Run step ``step``. ``rng`` is None for the global generator, as in training."""
    batch = torch.Generator().manual_seed(step)
    inputs = torch.randn(8, 16, generator=batch)
    targets = torch.randn(8, 4, generator=batch)
    loss = (model(inputs) - targets).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    tally.step = step
    tally.total += float(torch.rand(3, generator=rng).sum())


def differences(name: str, live: object, expected: object) -> list[str]:
    """List the entries of two nested state dicts that differ, comparing tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        same = isinstance(live, torch.Tensor) and live.dtype == expected.dtype and torch.equal(live, expected)
        return [] if same else [f"{name} differs"]
    if isinstance(expected, dict):
        if not isinstance(live, dict):
            return [f"{name} is {live!r}, expected a dict"]
        if set(live) != set(expected):
            return [f"{name} has keys {sorted(live, key=str)}, expected {sorted(expected, key=str)}"]
        problems = []
        for key in expected:
            problems += differences(f"{name}.{key}", live[key], expected[key])
        return problems
    return [] if live == expected else [f"{name} is {live!r}, expected {expected!r}"]


def compare_with_replay(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tally: Tally,
                        step: int) -> list[str]:
    """Rebuild the state of ``step`` from scratch and list what differs from the live state."""
    reference_model, reference_optimizer = build()
    reference_tally = Tally()
    reference_rng = torch.Generator().manual_seed(RNG_SEED + rank)
    for replayed in range(1, step + 1):
        train_step(reference_model, reference_optimizer, reference_tally, replayed, reference_rng)

    # Not resilient.state_digest: on an optimizer without state yet (a fresh start) it runs torch's
    # zero-gradient initialisation step, which advances Adam's step count and changes the training.
    problems = differences("model", model.state_dict(), reference_model.state_dict())
    problems += differences("optimizer", optimizer.state_dict(), reference_optimizer.state_dict())
    if not torch.equal(torch.get_rng_state(), reference_rng.get_state()):
        problems.append("the global torch RNG state differs")
    if (tally.step, tally.total) != (reference_tally.step, reference_tally.total):
        problems.append(f"tally {(tally.step, tally.total)}, expected {(reference_tally.step, reference_tally.total)}")
    return problems


model, optimizer = build()
tally = Tally()
torch.manual_seed(RNG_SEED + rank)
try:
    with resilient.Supervisor(ckpt_dir=ckpt_dir, save_every=1, keep=keep, collective_timeout=60) as sup:
        sup.register(model=model, optimizer=optimizer, stateful={"tally": tally})
        first = True
        for step in sup.steps(max_steps):
            if first:
                first = False
                resumed_step = step - 1
                problems = compare_with_replay(model, optimizer, tally, resumed_step)
                verdict = "ok" if not problems else "mismatch: " + "; ".join(problems)
                say(f"torture-resume rank {rank} step {resumed_step} {verdict}")
                if problems:
                    sys.exit(4)
            train_step(model, optimizer, tally, step, None)
finally:
    dist.destroy_process_group()
