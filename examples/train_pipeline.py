"""Train the byte-level language model of train_lm.py split into 2 pipeline stages, one per rank.

    torchrun --nproc-per-node 2 examples/train_pipeline.py --ckpt-dir runs/pipe --max-steps 60

Each stage has its own AdamW and LR scheduler. The stage modules keep the
full model's parameter names (``blocks.2.qkv.weight`` on stage 1, not
``0.weight``), so the two stages' weights and optimizer moments have distinct
checkpoint keys. At the end rank 0 prints ``final_state_digest=<sha256>``
over both stages' model and optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import ByteChunks, ByteLM, stdlib_text, warmup_cosine  # noqa: E402

import resilient  # noqa: E402

NUM_STAGES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", required=True, help="directory for this run's checkpoints")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps to train (default 60)")
    parser.add_argument("--save-every", type=int, default=20, help="periodic checkpoint interval in steps (default 20)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for weights, data order and dropout")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--microbatches", type=int, default=4, help="GPipe microbatches per step (default 4)")
    parser.add_argument("--block-size", type=int, default=128, help="sequence length in bytes (default 128)")
    parser.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks, split evenly (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--data-bytes", type=int, default=100_000, help="bytes of standard-library source")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps")
    parser.add_argument("--dump-optimizer", metavar="PREFIX",
                        help="at the end, write each stage's optimizer state_dict to PREFIX.rank<N>.pt")
    return parser.parse_args(argv)


class Stage(nn.Module):
    """One pipeline stage of ByteLM that keeps the full model's submodule names.

    Stage 0 embeds the tokens and runs the first half of the blocks; the last
    stage runs the rest and the output head.
    """

    def __init__(self, model: ByteLM, stage: int, num_stages: int) -> None:
        super().__init__()
        blocks = list(model.blocks)
        per_stage = len(blocks) // num_stages
        first, last = stage * per_stage, (stage + 1) * per_stage if stage < num_stages - 1 else len(blocks)
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        if self.is_first:
            self.embed, self.position, self.dropout = model.embed, model.position, model.dropout
        # A ModuleDict keyed by the original index keeps names such as blocks.2.qkv.weight.
        self.blocks = nn.ModuleDict({str(index): blocks[index] for index in range(first, last)})
        if self.is_last:
            self.norm, self.head = model.norm, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.dropout(self.embed(x) + self.position[:, : x.shape[1]])
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self.head(self.norm(x))
        return x


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


def pipeline_digest(stage: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Gather every stage's model and optimizer state on rank 0 and return their digest there. Collective."""
    model_state, optim_state = get_state_dict(stage, [optimizer])
    local = {"model": {k: v.detach().cpu() for k, v in model_state.items()}, "optim": optim_state}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None
    merged: dict = {"model": {}, "optim": {"state": {}, "param_groups": []}}
    for part in gathered:
        merged["model"].update(part["model"])
        merged["optim"]["state"].update(part["optim"]["state"])
        merged["optim"]["param_groups"].extend(part["optim"]["param_groups"])
    return resilient.tree_digest(merged)


def train(args: argparse.Namespace, config: resilient.Config) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != NUM_STAGES:
        raise SystemExit(f"train_pipeline.py runs {NUM_STAGES} stages, one per rank; start it with "
                         f"--nproc-per-node {NUM_STAGES}, not {world_size}")

    torch.manual_seed(args.seed)
    full = ByteLM(args.block_size, args.d_model, args.layers, args.heads, args.dropout)
    stage_module = Stage(full, rank, NUM_STAGES)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.max_steps))
    stage = PipelineStage(stage_module, rank, NUM_STAGES, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches, loss_fn=lm_loss)

    # Every stage reads the same batches: stage 0 needs the inputs, the last stage the targets.
    dataset = ByteChunks(stdlib_text(args.data_bytes), args.block_size)
    sampler = resilient.ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed,
                                         drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    with resilient.Supervisor(config) as sup:
        sup.register(model=stage_module, optimizer=optimizer, scheduler=scheduler, pipeline_stages=NUM_STAGES)
        for step, (inputs, targets) in sup.train(loader, args.max_steps):
            optimizer.zero_grad(set_to_none=True)
            losses: list[torch.Tensor] = []
            if stage_module.is_first:
                schedule.step(inputs)
            else:
                schedule.step(target=targets, losses=losses)
            torch.nn.utils.clip_grad_norm_(stage_module.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if stage_module.is_last and (step % args.log_every == 0 or step == 1):
                loss = torch.stack(losses).mean().item()
                print(f"step {step:4d}  loss {loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}", flush=True)

    if args.dump_optimizer:
        torch.save(optimizer.state_dict(), f"{args.dump_optimizer}.rank{rank}.pt")
    digest = pipeline_digest(stage_module, optimizer)
    if digest is not None:
        print(f"final_state_digest={digest}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = resilient.Config(ckpt_dir=args.ckpt_dir, save_every=args.save_every)
    except resilient.ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    resilient.init_process_group("gloo")
    try:
        train(args, config)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
