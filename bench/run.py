"""Measure resilient against plain tools on the same state and disk, side by side in one run.

Run from the repository root:

    .venv/bin/python bench/run.py            # full run, prints a table
    .venv/bin/python bench/run.py --quick    # smaller state, under 3 minutes on 2 cores
    .venv/bin/python bench/run.py --json     # one JSON object instead of the table

Each figure is a ratio or a time measured in this run, never compared with a
number from another machine. docs/benchmarks.md explains every key and
records a full run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import resilient  # noqa: E402
from resilient.checkpoint.discovery import iter_complete_newest_first  # noqa: E402
from resilient.checkpoint.fsutil import fsync_file  # noqa: E402
from resilient.checkpoint.layout import MARKER_NAME, read_run_id  # noqa: E402

#: The project's targets for each figure, with the direction in which a figure is better.
GOALS: dict[str, tuple[str, float, str]] = {
    "async_stall_ratio": ("<=", 0.03, "training-loop blocking of a background save / a synchronous save"),
    "save_vs_dd": (">=", 0.85, "synchronous save throughput / dd conv=fsync throughput, same bytes"),
    "save_vs_dcp": ("<=", 1.05, "resilient synchronous save time / plain torch.distributed.checkpoint.save"),
    "save_vs_torch_save": ("", 0.0, "resilient synchronous save time / torch.save plus fsync"),
    "agreement_overhead_pct": ("<=", 0.5, "extra step time from the stop agreement, % of a 100 ms step"),
    "preempt_to_exit_s": ("<=", 7.5, "signal to marked checkpoint and all ranks exited, 1 GiB over 2 ranks"),
    "resume_vs_read": ("<=", 1.3, "resume (discover, verify, load) / raw read of the same bytes"),
    "discovery_ms_1000": ("<=", 50.0, "ms to find the newest complete checkpoint among 1,000 directories"),
    "async_rss_ratio": ("<=", 1.1, "peak extra resident memory during a background save / state bytes"),
    "writer_thread_throughput": ("", 0.0, "training speed while a writer thread saves / speed without a save"),
    "writer_process_throughput": ("", 0.0, "training speed while a writer process saves / speed without a save"),
}

MIB = 1 << 20


# -- helpers ----------------------------------------------------------------------------


def make_model(megabytes: int) -> nn.Module:
    """Linear layers of 4 MiB each (1024 x 1024 float32), ``megabytes`` in all."""
    torch.manual_seed(0)
    layers = max(megabytes // 4, 1)
    return nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(layers)))


def state_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def read_all(directory: Path) -> int:
    total = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as handle:
                while chunk := handle.read(16 * MIB):
                    total += len(chunk)
    return total


def evict(directory: Path) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rss() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident size of this process (VmHWM); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def spin_matmul(until: Any, seconds: float | None = None) -> float:
    """Run small matrix products until ``until()`` is true (or for ``seconds``); return products per second."""
    matrix = torch.randn(256, 256)
    count = 0
    start = time.perf_counter()
    while True:
        matrix = torch.tanh(matrix @ matrix * 0.01)
        count += 1
        elapsed = time.perf_counter() - start
        if (seconds is not None and elapsed >= seconds) or (seconds is None and until()):
            return count / elapsed


def _process_writer(requests: Any, done: Any, staged: dict[str, torch.Tensor]) -> None:
    while (path := requests.get()) is not None:
        writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        dcp.save(staged, storage_writer=writer, no_dist=True)
        done.put(path)


# -- one process: saves, resume, memory, writers ----------------------------------------


def single_process(megabytes: int, work: Path, rounds: int) -> dict[str, Any]:
    # The model alone. For an optimizer without state (SGD without momentum) and parameters without
    # gradients, as here, torch's get_state_dict() allocates zero gradients and runs a step at every
    # call, which would charge resilient for work that plain DCP never does.
    model = make_model(megabytes)
    size = state_bytes(model)
    out: dict[str, Any] = {"state_bytes": size}
    times: dict[str, list[float]] = {"dd": [], "resilient": [], "dcp": [], "torch_save": []}

    def run_dd(index: int) -> None:
        target = work / f"dd-{index}.bin"
        start = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={size // (4 * MIB)}",
                        "conv=fsync", "status=none"], check=True)
        times["dd"].append(time.perf_counter() - start)
        target.unlink()

    def run_resilient(index: int) -> None:
        with resilient.Supervisor(ckpt_dir=work / f"sync-{index}", deadline=None, keep=1) as sup:
            sup.register(model=model)
            sup.resume()
            start = time.perf_counter()
            sup.save("manual")
            times["resilient"].append(time.perf_counter() - start)
        if index:
            shutil.rmtree(work / f"sync-{index}")

    def run_dcp(index: int) -> None:
        start = time.perf_counter()
        writer = dcp.FileSystemWriter(work / f"dcp-{index}", single_file_per_rank=True, sync_files=True,
                                      thread_count=1)
        dcp.save(model.state_dict(), storage_writer=writer, no_dist=True)
        times["dcp"].append(time.perf_counter() - start)
        shutil.rmtree(work / f"dcp-{index}")

    def run_torch_save(index: int) -> None:
        start = time.perf_counter()
        target = work / f"torch-{index}.pt"
        torch.save(model.state_dict(), target)
        fsync_file(target)
        times["torch_save"].append(time.perf_counter() - start)
        target.unlink()

    tools = [run_dd, run_resilient, run_dcp, run_torch_save]
    for index in range(rounds):
        # Rotate the order so a change in machine load or in the disk's write-back hits every tool alike.
        for tool in tools[index % 4:] + tools[:index % 4]:
            # Start each tool with no dirty pages of the previous one still being written back.
            os.sync()
            tool(index)

    best = {name: statistics.median(values) for name, values in times.items()}
    out["seconds"] = best
    out["save_vs_dd"] = (size / best["resilient"]) / (size / best["dd"])
    out["save_vs_dcp"] = best["resilient"] / best["dcp"]
    out["save_vs_torch_save"] = best["resilient"] / best["torch_save"]

    # Resume from the first synchronous checkpoint next to a raw read of its files, both from the disk.
    checkpoint = work / "sync-0"
    read_times, resume_times = [], []
    for index in range(rounds + 1):
        evict(checkpoint)
        start = time.perf_counter()
        read_bytes = read_all(next(checkpoint.glob("step_*")))
        read_times.append(time.perf_counter() - start)
        fresh = make_model(megabytes)
        evict(checkpoint)
        with resilient.Supervisor(ckpt_dir=checkpoint, deadline=None) as sup:
            sup.register(model=fresh)
            start = time.perf_counter()
            sup.resume()
            if index:  # the first resume in a process also imports DCP's loading code
                resume_times.append(time.perf_counter() - start)
        del fresh
    out["read_bytes"] = read_bytes
    out["seconds"]["raw_read"] = statistics.median(read_times)
    out["seconds"]["resume"] = statistics.median(resume_times)
    out["resume_vs_read"] = out["seconds"]["resume"] / out["seconds"]["raw_read"]

    return out


# -- a fresh process: background saves, their memory, writer thread or process --------------


def background_worker(megabytes: int, work: Path) -> None:
    """Run in a new process, so the memory measured is not memory freed by earlier sections."""
    # The model alone. For an optimizer without state (SGD without momentum) and parameters without
    # gradients, as here, torch's get_state_dict() allocates zero gradients and runs a step at every
    # call, which would charge resilient for work that plain DCP never does.
    model = make_model(megabytes)
    size = state_bytes(model)
    out: dict[str, Any] = {"seconds": {}}
    # Background saves: the first allocates the staging buffers, the later ones reuse them.
    base_rate = spin_matmul(None, seconds=2.0)
    peak_supported = True
    blocks = []
    thread_rate = 0.0
    with resilient.Supervisor(ckpt_dir=work / "async", deadline=None, keep=1, async_save=True) as sup:
        sup.register(model=model)
        sup.resume()
        busy = sup._background.busy  # noqa: SLF001 - the benchmark looks inside on purpose
        for step in sup.steps(7):
            if step == 1:
                # Collect garbage now, so no collection frees memory during the measured save.
                gc.collect()
                peak_supported = reset_peak_rss()
                before = rss()
            elif step == 2:
                sup.wait_for_save()
                out["async_extra_peak_bytes"] = peak_rss() - before
                out["seconds"]["async_block_first"] = sup.last_blocking_seconds
            else:
                blocks.append(sup.last_blocking_seconds)
                if step == 4:
                    thread_rate = spin_matmul(lambda: not busy())
                sup.wait_for_save()
            if step < 6:
                sup.request_save()
    out["seconds"]["async_block"] = statistics.median(blocks)
    out["async_rss_ratio"] = out["async_extra_peak_bytes"] / size if peak_supported else None
    out["writer_thread_throughput"] = thread_rate / base_rate

    context = mp.get_context("spawn")
    staged = {name: value.detach().clone().share_memory_() for name, value in model.state_dict().items()}
    requests, done = context.Queue(), context.Queue()
    process = context.Process(target=_process_writer, args=(requests, done, staged), daemon=True)
    process.start()
    requests.put(str(work / "process-warmup"))
    done.get()
    requests.put(str(work / "process"))
    process_rate = spin_matmul(lambda: not done.empty())
    requests.put(None)
    process.join()
    out["writer_process_throughput"] = process_rate / base_rate
    print(json.dumps(out), flush=True)


def background(megabytes: int, work: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "background", "--mb",
                           str(megabytes), "--dir", str(work)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 1,000 checkpoint directories ---------------------------------------------------------


def discovery(work: Path, rounds: int) -> dict[str, Any]:
    root = work / "many"
    model = make_model(4)
    with resilient.Supervisor(ckpt_dir=root, deadline=None, keep=1) as sup:
        sup.register(model=model)
        sup.resume()
        template = sup.save("manual").path
    run_id = read_run_id(root)
    manifest = json.loads((template / MARKER_NAME).read_text())
    for step in range(1, 1001):
        target = root / f"step_{step:09d}"
        if step % 10 in (3, 7):
            # Partial: a staging directory, or a final name whose marker was never written.
            name = target.with_name(f"{target.name}.tmp-bench") if step % 10 == 3 else target
            shutil.copytree(template, name)
            (name / MARKER_NAME).unlink()
            continue
        shutil.copytree(template, target)
        (target / MARKER_NAME).write_text(json.dumps(dict(manifest, step=step)))
    shutil.rmtree(template)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        newest = next(iter_complete_newest_first(root, run_id, log_skips=False))
        samples.append(time.perf_counter() - start)
    return {"discovery_ms_1000": 1000 * statistics.median(samples), "newest": newest.step}


# -- two ranks: agreement overhead, preemption to exit --------------------------------------


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]


def agreement(steps: int) -> dict[str, Any]:
    done = subprocess.run(torchrun(str(REPO / "bench" / "agreement.py"), "--steps", str(steps), "--step-ms", "100"),
                          capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in done.stdout.splitlines():
        if line.startswith("agreement_overhead_pct="):
            return {"agreement_overhead_pct": float(line.split("=", 1)[1])}
    raise RuntimeError(f"bench/agreement.py printed no result:\n{done.stdout}\n{done.stderr}")


class Shard:
    """Per-rank state of a given size, saved under this rank's own keys."""

    def __init__(self, megabytes: int) -> None:
        self.values = torch.randn(megabytes * MIB // 4)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.copy_(state["values"])


def preempt_worker(megabytes_per_rank: int, ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    resilient.init_process_group("gloo")
    model = make_model(4)
    with resilient.Supervisor(ckpt_dir=ckpt_dir, deadline=None) as sup:
        sup.register(model=model, stateful={"shard": Shard(megabytes_per_rank)})
        for step in sup.steps(1_000_000):
            time.sleep(0.05)
            if step == 5 and torch.distributed.get_rank() == 0:
                print("bench ready", flush=True)


def preempt(megabytes_per_rank: int, work: Path) -> dict[str, Any]:
    ckpt = work / "preempt"
    command = torchrun(str(Path(__file__).resolve()), "--worker", "preempt", "--mb", str(megabytes_per_rank),
                       "--dir", str(ckpt))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    assert process.stdout is not None
    ready = threading.Event()

    def watch() -> None:
        for line in process.stdout:
            if "bench ready" in line:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(300):
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError("the preemption job did not reach step 5 within 300 s")
    start = time.perf_counter()
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(300)
    seconds = time.perf_counter() - start
    marked = [path for path in ckpt.glob("step_*") if (path / MARKER_NAME).exists()
              and json.loads((path / MARKER_NAME).read_text())["reason"] == "preemption"]
    total = 2 * megabytes_per_rank * MIB
    # Without a marked preemption checkpoint the time measures a failure, not a save.
    # Below 1 GiB (--quick) the time is scaled linearly, fixed costs included, so it overstates.
    return {"preempt_measured_s": seconds, "preempt_bytes": total, "preempt_marked": bool(marked),
            "preempt_scaled": total != 1 << 30,
            "preempt_to_exit_s": seconds * (1 << 30) / total if marked else None}


# -- report -------------------------------------------------------------------------------


def verdict(key: str, value: float | None, details: dict[str, Any]) -> str:
    direction, goal, _meaning = GOALS[key]
    if value is None:
        return "not measured"
    if not direction:
        return ""
    if key == "preempt_to_exit_s" and details.get("preempt_scaled"):
        return "scaled, not checked"
    met = value <= goal if direction == "<=" else value >= goal
    return f"goal {direction} {goal:g}: {'met' if met else 'missed'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller state and fewer rounds (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a "
                        "new directory under the system's temporary directory)")
    parser.add_argument("--worker", choices=("preempt", "background"), help=argparse.SUPPRESS)
    parser.add_argument("--mb", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "preempt":
        preempt_worker(args.mb, args.dir)
        return
    if args.worker == "background":
        background_worker(args.mb, Path(args.dir))
        return

    single_mb, rank_mb, rounds, agreement_steps = (128, 64, 4, 40) if args.quick else (512, 512, 4, 200)
    work = Path(tempfile.mkdtemp(prefix="resilient-bench-", dir=args.dir))
    started = time.perf_counter()
    try:
        results: dict[str, Any] = {}
        details: dict[str, Any] = {}
        for name, measure in (("single", lambda: single_process(single_mb, work, rounds)),
                              ("background", lambda: background(single_mb, work)),
                              ("discovery", lambda: discovery(work, 5 if args.quick else 20)),
                              ("agreement", lambda: agreement(agreement_steps)),
                              ("preempt", lambda: preempt(rank_mb, work))):
            if not args.json:
                print(f"measuring {name} ...", file=sys.stderr, flush=True)
            section = measure()
            for key, value in section.items():
                if key == "seconds":
                    details.setdefault("seconds", {}).update(value)
                else:
                    (results if key in GOALS else details).__setitem__(key, value)
            if name == "single":
                shutil.rmtree(work / "async", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["async_stall_ratio"] = details["seconds"]["async_block"] / details["seconds"]["resilient"]
    details.update(quick=args.quick, seconds_total=time.perf_counter() - started, cpus=os.cpu_count(),
                   torch=torch.__version__, resilient=resilient.__version__)
    if args.json:
        print(json.dumps({**results, "details": details}, indent=2, default=str))
        return
    print(f"\nresilient benchmark ({'quick' if args.quick else 'full'}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {details['seconds_total']:.0f} s)")
    print(f"{'key':<27} {'value':>10}  {'':<20} meaning")
    for key, (_direction, _goal, meaning) in GOALS.items():
        value = results.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{key:<27} {shown:>10}  {verdict(key, value, details):<20} {meaning}")
    state = details["state_bytes"] / MIB
    scaled = " and scaled linearly to 1 GiB" if details["preempt_scaled"] else ""
    print(f"\nsingle-process state {state:.0f} MiB; preemption measured {details['preempt_measured_s']:.2f} s for "
          f"{details['preempt_bytes'] / MIB:.0f} MiB{scaled}"
          f"{'' if details['preempt_marked'] else ' (NO preemption checkpoint was marked)'}.")
    print("seconds: " + ", ".join(f"{name} {value:.3f}" for name, value in details["seconds"].items()))


if __name__ == "__main__":
    main()
