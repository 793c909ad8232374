"""A dedicated gloo process group for resilient's own collectives.

Agreement and checkpoint coordination run on their own group so they never
interleave with the training job's collectives (which may run on NCCL), and so
they fail after ``timeout`` instead of the training group's timeout. Without
``torch.distributed`` initialised everything runs as a single process.
"""

from __future__ import annotations

import contextlib
import warnings
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from resilient._logging import get_logger

log = get_logger(__name__)


def _ignore_single_process_warning() -> None:
    # Adding an identical filter again replaces it, so calling this every time
    # keeps the filter in place even when something reset the filters since.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                            module=r"torch\.distributed\.checkpoint")


class Comm:
    """Collectives on resilient's group. Every method is collective: all ranks must call it."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            # new_group is itself collective on the default group.
            self.group: Any = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
        else:
            self.rank = 0
            self.world_size = 1
            self.group = None

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def all_reduce_max(self, value: int) -> int:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return int(tensor.item())

    def all_reduce_max_vector(self, values: list[int]) -> list[int]:
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [int(value) for value in tensor.tolist()]

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if not self.distributed:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    @contextlib.contextmanager
    def quiet_single_process(self) -> Iterator[None]:
        """Silence DCP's warning that it runs without a process group, which is intended here.

        ``warnings.catch_warnings`` is not thread-safe and background saves call
        DCP from another thread, so a narrow filter is added to the global list instead.
        """
        if not self.distributed:
            _ignore_single_process_warning()
        yield

    def sibling(self) -> "Comm":
        """Return a Comm on a new gloo group of the same ranks. Collective on the default group.

        Background saves run their collectives on it, so they never interleave
        with the agreement and synchronous saves on this group.
        """
        other = Comm.__new__(Comm)
        other.timeout_seconds = self.timeout_seconds
        other.rank, other.world_size = self.rank, self.world_size
        other.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_seconds))
                       if self.distributed else None)
        return other

    def destroy(self) -> None:
        if self.distributed and dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except Exception as err:  # noqa: BLE001 - shutdown must not mask the real exit path
                log.debug("Destroying resilient's process group failed: %s", err)
        self.group = None
