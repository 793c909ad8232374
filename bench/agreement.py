"""Measure the cost of the stop agreement next to a training step, on 2 ranks.

Run: torchrun --standalone --nproc-per-node 2 bench/agreement.py [--steps 200] [--step-ms 100]

Each iteration does a simulated step of ``--step-ms`` milliseconds (sleeping,
as a GPU-bound step leaves the CPU idle, or spinning with ``--spin``) plus a small DDP-like all-reduce, then (in the measured variant) the
agreement all-reduce on resilient's own gloo group. Rank 0 prints the mean
agreement time and the overhead as a percentage of the step, measured side
by side in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from resilient.agreement import Agreement
from resilient.comm import Comm
from resilient.signals import SignalRecorder


def busy(milliseconds: float, spin: bool) -> None:
    """Simulate a step: spinning keeps the core busy (CPU training), sleeping leaves it idle (GPU training)."""
    if not spin:
        time.sleep(milliseconds / 1000)
        return
    end = time.perf_counter() + milliseconds / 1000
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="iterations per variant (default 200)")
    parser.add_argument("--step-ms", type=float, default=100.0, help="simulated step time in ms (default 100)")
    parser.add_argument("--spin", action="store_true",
                        help="keep the CPU busy during the simulated step instead of sleeping (a CPU-bound step)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    recorder = SignalRecorder(["SIGUSR2"]).install()
    # Each variant has its own group, as in a job, so their collectives never queue behind each other.
    variants = {"overlapped": Agreement(Comm(60), recorder, 1, overlap=True),
                "blocking": Agreement(Comm(60), recorder, 1, overlap=False)}
    gradients = torch.zeros(1024)

    def step(agreement: Agreement | None, index: int) -> float:
        start = time.perf_counter()
        busy(args.step_ms, args.spin)
        dist.all_reduce(gradients)
        if agreement is not None:
            agreement.agree(index)
        return time.perf_counter() - start

    # Interleave the variants so drift in machine load affects all alike.
    times: dict[str, list[float]] = {"none": [], "overlapped": [], "blocking": []}
    for index in range(1, args.steps + 1):
        times["none"].append(step(None, index))
        for name, agreement in variants.items():
            step(agreement, index)
    variants["overlapped"].drain()
    for agreement in variants.values():
        agreement.comm.destroy()
    recorder.restore()

    if dist.get_rank() == 0:
        step_seconds = args.step_ms / 1000
        print(f"median step without agreement: {statistics.median(times['none']) * 1000:.3f} ms")
        for name, agreement in variants.items():
            print(f"{name:>10} agreement: mean {agreement.mean_seconds * 1e6:.0f} us blocked per step, "
                  f"{100 * agreement.mean_seconds / step_seconds:.3f} % of a {args.step_ms:g} ms step")
        print(f"agreement_overhead_pct={100 * variants['overlapped'].mean_seconds / step_seconds:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
