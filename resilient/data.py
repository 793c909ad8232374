"""Data position: which epoch and how many batches of it each rank has consumed."""

from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from resilient._logging import get_logger
from resilient.errors import ConfigError

log = get_logger(__name__)


def _to_hex(state: torch.Tensor | None) -> str | None:
    return None if state is None else state.numpy().tobytes().hex()


def _from_hex(text: str | None) -> torch.Tensor | None:
    return None if text is None else torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch part-way through.

    ``skip(n)`` drops the first ``n`` indices of the current epoch's order, so
    a resumed run continues with exactly the samples the interrupted run would
    have seen next. The order depends only on ``seed`` and the epoch, as in
    ``DistributedSampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._global_skip: int | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._skip = 0
        self._global_skip = None

    def resume_after(self, samples_per_rank: int, saved_world_size: int) -> None:
        """Continue the epoch after each of ``saved_world_size`` ranks consumed ``samples_per_rank`` samples.

        Ranks of a ``DistributedSampler`` take every ``world_size``-th index of
        the epoch's order, so in lockstep they have together consumed its first
        ``samples_per_rank * saved_world_size`` indices. With another world size
        the rest of the order is split among the current ranks, so each
        remaining sample is seen once (with ``drop_last``, up to
        ``num_replicas - 1`` samples at the end are dropped, as in any epoch).
        """
        if saved_world_size == self.num_replicas:
            self.skip(samples_per_rank)
            return
        self._skip = 0
        self._global_skip = samples_per_rank * saved_world_size

    def skip(self, num_samples: int) -> None:
        """Drop the first ``num_samples`` indices of the current epoch."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be at least 0, got {num_samples}")
        self._skip = num_samples

    def __iter__(self) -> Iterator[int]:
        if self._global_skip is not None:
            return iter(self._redistributed())
        indices = list(super().__iter__())
        return iter(indices[self._skip:])

    def __len__(self) -> int:
        if self._global_skip is not None:
            return len(self._redistributed())
        return max(self.num_samples - self._skip, 0)

    def _redistributed(self) -> list[int]:
        """Return this rank's share of the epoch's order after the first ``_global_skip`` indices."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = list(range(len(self.dataset)))
        remaining = order[min(self._global_skip or 0, len(order)):]
        if self.drop_last:
            remaining = remaining[: len(remaining) - len(remaining) % self.num_replicas]
        elif remaining and len(remaining) % self.num_replicas:
            remaining += remaining[: self.num_replicas - len(remaining) % self.num_replicas]
        return remaining[self.rank::self.num_replicas]


class _IgnoreSignalsInWorker:
    """A DataLoader ``worker_init_fn`` that ignores the stop signals, then runs the user's one.

    torchrun and SLURM signal every process of the job, and torch's worker
    handler exits on a SIGTERM that does not come from its parent. The training
    process would then fail mid-step instead of writing its preemption
    checkpoint. Workers still end when the main process shuts them down or dies.
    """

    def __init__(self, signals: tuple[int, ...], user_init: Any) -> None:
        self.signals = signals
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)
        if self.user_init is not None:
            self.user_init(worker_id)


class BatchStream:
    """Endless batches from a DataLoader, across epochs, tracking the position.

    The position advances when a batch is handed to the training loop, not when
    the loader prefetches it, so the saved position is the true one.
    """

    def __init__(self, loader: DataLoader, epoch: int = 0, batch_in_epoch: int = 0,
                 stop_signals: tuple[int, ...] = ()) -> None:
        self.loader = loader
        if stop_signals and loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _IgnoreSignalsInWorker):
            loader.worker_init_fn = _IgnoreSignalsInWorker(tuple(stop_signals), loader.worker_init_fn)
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        self._iterator: Iterator[Any] | None = None
        self._epochs_without_batches = 0
        self._saved_world_size: int | None = None
        self._epoch_rng: torch.Tensor | None = None
        self._loader_rng: torch.Tensor | None = None

    def state(self) -> dict[str, Any]:
        """Return what a resume needs to re-create this epoch's iterator.

        Creating the iterator draws the shuffle seed of a ``RandomSampler`` and
        the workers' base seed from torch's global generator (or the loader's
        own ``generator``), so the generator states taken just before are kept.
        The sampler's number of replicas tells a resume whether the data must
        be redistributed over another number of ranks.
        """
        return {"epoch_rng": _to_hex(self._epoch_rng), "loader_rng": _to_hex(self._loader_rng),
                "num_replicas": getattr(self.sampler, "num_replicas", None)}

    def reopen_epoch(self, saved: dict[str, Any], data_on_resize: str = "error") -> None:
        """Re-create the current epoch's iterator with the generator states it had, then skip consumed batches.

        When the sampler had another number of replicas when the checkpoint was
        saved, a ResumableSampler splits the rest of the epoch among the current
        ranks. Any other data source raises ConfigError, or with
        ``data_on_resize="restart_epoch"`` starts the epoch over.
        """
        saved_world_size = saved.get("num_replicas")
        self._saved_world_size = saved_world_size
        sampler = self.sampler
        world_size = getattr(sampler, "num_replicas", None)
        if saved_world_size is not None and world_size is not None and saved_world_size != world_size \
                and not isinstance(sampler, ResumableSampler):
            source = type(sampler).__name__
            if data_on_resize != "restart_epoch":
                raise ConfigError(
                    f"cannot redistribute the rest of epoch {self.epoch} from {saved_world_size} to {world_size} "
                    f"ranks with a {source}: it only skips whole batches of one rank. Use "
                    "resilient.ResumableSampler, or pass data_on_resize='restart_epoch' to start the epoch over."
                )
            log.warning("Restarting epoch %d from its first batch after a change from %d to %d ranks "
                        "(data_on_resize='restart_epoch'); samples seen before the change are seen again.",
                        self.epoch, saved_world_size, world_size)
            self.batch_in_epoch = 0
            self._saved_world_size = None
        epoch_rng, loader_rng = _from_hex(saved.get("epoch_rng")), _from_hex(saved.get("loader_rng"))
        if self.epoch > 0 and getattr(self.loader, "persistent_workers", False) and self.loader._iterator is None:
            # With persistent workers only the first epoch creates the iterator and
            # later epochs reset it, which draws fewer numbers. Create it now, so
            # that open_epoch() below resets it as the interrupted run did.
            iter(self.loader)
        if epoch_rng is not None:
            torch.set_rng_state(epoch_rng)
        generator = getattr(self.loader, "generator", None)
        if loader_rng is not None and generator is not None:
            generator.set_state(loader_rng)
        if epoch_rng is None:
            log.warning("The checkpoint has no generator state from the start of epoch %d; a DataLoader that "
                        "shuffles with torch's global generator may see another order.", self.epoch)
        self.open_epoch()

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def open_epoch(self) -> None:
        """Create the iterator for the current epoch, skipping the batches already consumed.

        Creating a DataLoader iterator draws a seed from torch's global
        generator, so the caller decides when this happens relative to
        restoring the RNG state.
        """
        sampler = self.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        skip_batches = self.batch_in_epoch
        self._epoch_rng = torch.get_rng_state()
        generator = getattr(self.loader, "generator", None)
        self._loader_rng = generator.get_state() if generator is not None else None
        if skip_batches and isinstance(sampler, ResumableSampler):
            batch_size = self.loader.batch_size
            if batch_size is None:
                raise ValueError("ResumableSampler needs a DataLoader with batch_size set to skip whole batches")
            sampler.resume_after(skip_batches * batch_size, self._saved_world_size or sampler.num_replicas)
            self._saved_world_size = None
            skip_batches = 0
        self._iterator = iter(self.loader)
        if skip_batches:
            # Without a sampler that can skip, the consumed batches are loaded and dropped.
            log.warning("Fast-forwarding %d batches of epoch %d by loading them; with a map-style dataset, "
                        "resilient.ResumableSampler skips them without loading.", skip_batches, self.epoch)
            for _ in range(skip_batches):
                try:
                    next(self._iterator)
                except StopIteration:
                    break

    def close(self) -> None:
        """Shut down the loader's worker processes now.

        Workers ignore the stop signals, so they must not be left to
        multiprocessing's exit handler, which ends them with SIGTERM and then
        waits for them forever.
        """
        iterator, self._iterator = self._iterator, None
        # NOTE: _shutdown_workers is private DataLoader API (torch 2.13); persistent
        # workers keep their iterator on the loader, so that one is shut down too.
        for candidate in (iterator, getattr(self.loader, "_iterator", None)):
            shutdown = getattr(candidate, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def next_batch(self) -> Any:
        while True:
            if self._iterator is None:
                self.open_epoch()
            assert self._iterator is not None
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.batch_in_epoch == 0:
                    self._epochs_without_batches += 1
                    if self._epochs_without_batches > 1:
                        raise ValueError("the DataLoader produced no batches in a whole epoch; check the dataset "
                                         "size against batch_size and drop_last") from None
                self.epoch += 1
                self.batch_in_epoch = 0
                self._iterator = None
                continue
            self._epochs_without_batches = 0
            self.batch_in_epoch += 1
            return batch
