"""Train a small byte-level transformer language model with DDP, preemption-safe.

Run on 2 CPU ranks (the same command starts a new run or resumes one):

    torchrun --nproc-per-node 2 examples/train_lm.py --ckpt-dir runs/lm --max-steps 60

The text is the Python standard library's own source, so no download is
needed. On SIGTERM or SIGUSR1 every rank checkpoints the same step and the
process exits with status 75. At the end rank 0 prints
``final_state_digest=<sha256>`` over the model and optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

import resilient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", required=True, help="directory for this run's checkpoints")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps to train (default 60)")
    parser.add_argument("--save-every", type=int, default=20, help="periodic checkpoint interval in steps (default 20)")
    parser.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (default 3)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for weights, data order and dropout")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step (default 16)")
    parser.add_argument("--block-size", type=int, default=128, help="sequence length in bytes (default 128)")
    parser.add_argument("--d-model", type=int, default=192, help="model width (default 192)")
    parser.add_argument("--layers", type=int, default=3, help="transformer blocks (default 3)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--data-bytes", type=int, default=200_000,
                        help="bytes of standard-library source to train on (default 200000, about 48 batches per "
                             "rank per epoch with the defaults, so runs cross epoch boundaries)")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps")
    parser.add_argument("--async-save", action="store_true",
                        help="write periodic checkpoints on a background thread while training goes on")
    parser.add_argument("--async-busy", choices=("wait", "skip"), default="wait",
                        help="when a save is due while a background save is still being written: wait for it "
                             "(default) or skip this save")
    parser.add_argument("--save-interval", default=None,
                        help="also save every this many seconds, or 'auto' for the Young-Daly interval")
    parser.add_argument("--mtbf", type=float, default=None,
                        help="mean time between failures in seconds for --save-interval auto "
                             "(default: observed from the run's journal)")
    parser.add_argument("--grace-period", type=float, default=None,
                        help="seconds between a stop signal and the scheduler's SIGKILL; a stop save that "
                             "cannot fit is skipped")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="evaluate on held-out batches every this many steps, checking for a stop "
                             "between batches (default 0: never)")
    parser.add_argument("--eval-batches", type=int, default=20, help="batches per evaluation (default 20)")
    parser.add_argument("--eval-delay", type=float, default=0.0,
                        help="seconds to sleep per evaluation batch, to stand in for a long evaluation")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the model with FSDP2 (fully_shard) on a CPU device mesh instead of DDP")
    return parser.parse_args(argv)


# -- data ---------------------------------------------------------------------------


def stdlib_text(num_bytes: int) -> bytes:
    """Return the first ``num_bytes`` of the standard library's .py files, in sorted file order."""
    library = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(library.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    text = b"".join(chunks)[:num_bytes]
    if len(text) < num_bytes:
        raise SystemExit(f"only {len(text)} bytes of source found under {library}; lower --data-bytes")
    return text


class ByteChunks(Dataset):
    """Non-overlapping windows of ``block_size + 1`` bytes: input and next-byte target."""

    def __init__(self, data: bytes, block_size: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        window = self.tokens[start:start + self.block_size + 1]
        return window[:-1], window[1:]


# -- model --------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(width // self.heads)
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        weights = self.attn_dropout(scores.masked_fill(mask, float("-inf")).softmax(dim=-1))
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.resid_dropout(self.proj(attended))
        return x + self.resid_dropout(self.mlp(self.norm2(x)))


class ByteLM(nn.Module):
    """A decoder-only transformer over bytes."""

    def __init__(self, block_size: int, d_model: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.zeros(1, block_size, d_model))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(d_model, heads, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(tokens) + self.position[:, : tokens.shape[1]])
        return self.head(self.norm(self.blocks(x)))


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# -- training -----------------------------------------------------------------------


def evaluate(model: nn.Module, dataset: ByteChunks, args: argparse.Namespace, sup: resilient.Supervisor,
             step: int) -> None:
    """Mean loss over the first ``--eval-batches`` batches, stopping early when the ranks agree to stop.

    Dropout is off and no random numbers are drawn, so evaluating does not
    change the training run's state.
    """
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(args.eval_batches):
            if sup.should_stop():
                # The stop is saved right after this step, so the evaluation is cut short, not lost time.
                if dist.get_rank() == 0:
                    print(f"eval at step {step} stopped after {count} batches", flush=True)
                break
            start = (index * args.batch_size) % max(len(dataset) - args.batch_size, 1)
            inputs, targets = (torch.stack(part) for part in zip(*(dataset[start + i]
                                                                  for i in range(args.batch_size))))
            logits = model(inputs)
            total += F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1)).item()
            count += 1
            if args.eval_delay:
                time.sleep(args.eval_delay)
    model.train()
    if dist.get_rank() == 0 and count == args.eval_batches:
        print(f"eval at step {step}  loss {total / count:.4f}", flush=True)


def train(args: argparse.Namespace, config: resilient.Config) -> None:
    rank = dist.get_rank()

    # Identical initial weights on every rank, then a per-rank stream for dropout.
    torch.manual_seed(args.seed)
    model = ByteLM(args.block_size, args.d_model, args.layers, args.heads, args.dropout)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    if args.fsdp:
        # Each block is its own FSDP unit, then the root takes the remaining parameters.
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        ddp_model = fully_shard(model, mesh=mesh)
    else:
        ddp_model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.max_steps))

    dataset = ByteChunks(stdlib_text(args.data_bytes), args.block_size)
    sampler = resilient.ResumableSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    with resilient.Supervisor(config) as sup:
        sup.register(model=ddp_model, optimizer=optimizer, scheduler=scheduler)
        for step, (inputs, targets) in sup.train(loader, args.max_steps):
            logits = ddp_model(inputs)
            loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(f"step {step:4d}  epoch {sup.trainer.epoch}  loss {loss.item():.4f}  "
                      f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            if args.eval_every and step % args.eval_every == 0:
                evaluate(ddp_model, dataset, args, sup, step)

    # Collective under FSDP: every rank gathers the shards in the same key order.
    digest = resilient.state_digest(ddp_model, optimizer)
    if rank == 0:
        print(f"final_state_digest={digest}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        # Checked before any work, so a bad flag costs nothing.
        interval = args.save_interval
        if interval is not None and interval != "auto":
            try:
                interval = float(interval)
            except ValueError:
                raise SystemExit(f"error: --save-interval must be a number of seconds or 'auto', "
                                 f"got {interval!r}") from None
        config = resilient.Config(ckpt_dir=args.ckpt_dir, save_every=args.save_every, keep=args.keep,
                                  async_save=args.async_save, async_busy=args.async_busy,
                                  save_interval=interval, mtbf=args.mtbf, grace_period=args.grace_period)
    except resilient.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    resilient.init_process_group("gloo")
    try:
        train(args, config)
    except SystemExit as stop:  # resilient.Preempted is a SystemExit with status 75
        status = stop.code if isinstance(stop.code, int) else 1
    else:
        status = 0
    finally:
        dist.destroy_process_group()
    if args.fsdp:
        # With FSDP on gloo, torch 2.13 can abort during interpreter shutdown, after everything is saved
        # (docs/fsdp.md, "Known issue"). Ending the process here skips that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
