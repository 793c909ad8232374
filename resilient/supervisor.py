"""The object a training loop uses: resume, decide at each step boundary, save, exit.

Typical use, on every rank::

    with resilient.Supervisor(ckpt_dir="ckpt", save_every=100) as sup:
        dist.init_process_group("gloo")
        ...build model, optimizer, scheduler, loader...
        sup.register(model=model, optimizer=optimizer, scheduler=scheduler)
        for step, batch in sup.train(loader, max_steps=10_000):
            ...forward, backward, optimizer.step(), scheduler.step()...

On an agreed preemption every rank saves the same step, and then raises
``Preempted`` (a ``SystemExit`` with status 75) out of the loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from resilient._logging import CONTEXT, get_logger
from resilient.agreement import Agreement, StopReason
from resilient.checkpoint.background import BackgroundSaver
from resilient.checkpoint.commit import SaveResult, save_checkpoint
from resilient.checkpoint.layout import REASONS, Manifest, ManifestError, record_resume_from
from resilient.checkpoint.load import load_latest
from resilient.checkpoint.lock import DirectoryLock
from resilient.checkpoint.retention import apply_retention
from resilient.codec import flatten, unflatten
from resilient.comm import Comm
from resilient.config import Config
from resilient.data import BatchStream
from resilient.deadline import Deadline, resolve_end_time
from resilient.errors import CheckpointError, ConfigError, Preempted
from resilient.progress import FINISHED, PREEMPTED, ProgressReporter
from resilient.run_dir import pending_resume_from, prepare_run_dir, set_aside_newer
from resilient.schedule import SaveSchedule
from resilient.signals import SignalRecorder
from resilient.stopping import StopAndSaveDecisions
from resilient.state import Registered, Stateful, TrainerState, restore_rng
from resilient.validation import check_disk_space, warn_on_version_change

log = get_logger(__name__)


def _as_list(single: Any, sequence: Sequence[Any]) -> list[Any]:
    items = list(sequence)
    if single is not None:
        items.insert(0, single)
    return items


def _batch_length(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_length(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_length(next(iter(batch.values())))
    return None


class Supervisor(StopAndSaveDecisions):
    """Preemption handling and coordinated checkpoints for one training process.

    Creating it installs the signal handlers (main thread only); leaving the
    ``with`` block, or :meth:`close`, restores the previous ones. Methods marked
    collective must be called by every rank at the same point.
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise ConfigError(f"pass either a Config or keyword settings, not both (got {sorted(settings)})")
        self.config = config if config is not None else Config(**settings)
        CONTEXT.step = None  # a previous Supervisor in this process may have left its step
        self.trainer = TrainerState()
        self.preempted = False
        self.resumed_from: Path | None = None
        self.last_save: SaveResult | None = None

        self._registered = Registered()
        self._comm: Comm | None = None
        self._agreement: Agreement | None = None
        self._run_id: str | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._resumed = False
        self._last_saved_step: int | None = None
        self._in_step: int | None = None
        self._abandoned_step: int | None = None
        self._save_requested: str | None = None
        self._stream: BatchStream | None = None
        self._saved_data: dict[str, Any] = {}
        self._closed = False
        self._grace_warned = False
        self._step_seconds: float | None = None
        self._progress: ProgressReporter | None = None
        self._background: BackgroundSaver | None = None
        self._lock = DirectoryLock(self.config.root)
        self._schedule = SaveSchedule(self.config.save_interval, self.config.mtbf, self.config.root)
        self._last_save_started_step: int | None = None
        self._signal_at: float | None = None
        #: Seconds the training loop was blocked by the last save (all of it when synchronous).
        self.last_blocking_seconds: float | None = None

        self.recorder = SignalRecorder(self.config.signals)
        self.recorder.install()

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the previous signal handlers and release resilient's process groups.

        A background save still being written is waited for (up to
        ``collective_timeout``); one abandoned for a stop never publishes.
        """
        if self._closed:
            return
        self._closed = True
        self.recorder.restore()
        writers_done = True
        if self._background is not None:
            writers_done = self._background.join_all(self._writer_join_timeout())
            flight = self._background.take_finished()
            if flight is not None:
                self._collect(flight, raise_errors=False)
            if not writers_done:
                log.warning("A background save is still being written at exit; it will not be marked complete.")
        if self._progress is not None:
            self._progress.close()
        self._lock.release()
        if self._comm is not None:
            # A gloo group left alive at interpreter exit can abort the process
            # ("terminate called without an active exception") instead of exiting 75.
            if self._background is not None and writers_done:
                self._background.writer.destroy()
            self._comm.destroy()

    def _writer_join_timeout(self) -> float:
        """Return the seconds close() waits for writer threads: after a stop with a grace period, only what is left.

        An abandoned save would otherwise keep the process alive until the
        scheduler's SIGKILL, and the exit status would be 137 instead of 75.
        """
        if self.preempted and self.config.grace_period is not None and self._signal_at is not None:
            left = self.config.grace_period - (time.monotonic() - self._signal_at)
            return max(left - 1.0, 0.0)
        return self.config.collective_timeout

    @property
    def rank(self) -> int:
        return self._comm.rank if self._comm else 0

    @property
    def world_size(self) -> int:
        return self._comm.world_size if self._comm else 1

    @property
    def run_id(self) -> str | None:
        return self._run_id

    # -- registration and resume -----------------------------------------------

    def register(
        self,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        scheduler: Any = None,
        schedulers: Sequence[Any] = (),
        scaler: Any = None,
        stateful: Mapping[str, Stateful] | None = None,
        pipeline_stages: int | None = None,
    ) -> "Supervisor":
        """Name the objects whose state is saved and restored. Call before :meth:`resume`.

        ``pipeline_stages`` is recorded in the manifest, so a resume with another
        number of stages fails with a clear message instead of missing keys.
        """
        if self._resumed:
            raise RuntimeError("register() must be called before resume(), train() or steps()")
        self._registered = Registered(model=model, optimizers=_as_list(optimizer, optimizers),
                                      schedulers=_as_list(scheduler, schedulers), scaler=scaler,
                                      stateful=dict(stateful or {}), pipeline_stages=pipeline_stages)
        self._registered.validate()
        return self

    def _connect(self) -> Comm:
        if self._closed:
            raise RuntimeError("this Supervisor is closed; create a new one to resume or save")
        if self._comm is None:
            self._comm = Comm(self.config.collective_timeout)
            CONTEXT.rank, CONTEXT.world_size = self._comm.rank, self._comm.world_size
            # init_process_group may have loaded a library that took over a signal.
            self.recorder.ensure_installed()
            self._agreement = Agreement(self._comm, self.recorder, self.config.check_every)
            if self._schedule.enabled:
                self._agreement.save_wanted = self._schedule.wanted
            if self.config.async_save:
                self._background = BackgroundSaver(self._comm.sibling(), self.config.root, self.config.keep)
            self._progress = ProgressReporter(self.config.root, self._comm.rank, self.recorder)
        return self._comm

    def _prepare_root(self, comm: Comm) -> tuple[str, Path | None]:
        """Return the run id and the explicit checkpoint to resume from, as decided by rank 0."""
        outcome: tuple[str | None, str | None, str | None] = (None, None, None)
        if comm.rank == 0:
            try:
                self._lock.acquire(self.config.run_id)
                run_id = prepare_run_dir(self.config.root, self.config.run_id)
                self._lock.record(run_id)
                resume_from = pending_resume_from(self.config.root, self.config.resume_from)
                outcome = (run_id, str(resume_from) if resume_from else None, None)
            except (ConfigError, ManifestError) as err:
                outcome = (None, None, str(err))
            except OSError as err:
                outcome = (None, None, f"ckpt_dir {str(self.config.root)!r} cannot be created or written ({err}); "
                                       "pass a directory this job can write to")
        run_id, resume_from, error = comm.broadcast_object(outcome)
        if error:
            raise ConfigError(error)
        return run_id, Path(resume_from) if resume_from else None

    def _state_tree(self, source_rank: int | None = None) -> dict[str, Any]:
        data = self._stream.state() if self._stream is not None else {"epoch_rng": None, "loader_rng": None,
                                                                      "num_replicas": None}
        rank = self.rank if source_rank is None else source_rank
        return self._registered.state_tree(rank, self.trainer, data)

    def _flatten_for_save(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        flat, leaves = flatten(self._state_tree())
        return flat, [leaf.key for leaf in leaves if leaf.is_json]

    def _source_rank(self, saved_world_size: int) -> int:
        """Return the saved rank whose per-rank state this rank loads: its own, or rank 0's when it is new."""
        return self.rank if self.rank < saved_world_size else 0

    def resume(self) -> TrainerState:
        """Load the newest complete checkpoint, if any, and return the trainer counters. Collective.

        The RNG state is restored when the step loop starts, not here, so that
        creating a DataLoader iterator in between cannot shift it.
        """
        if self._resumed:
            return self.trainer
        comm = self._connect()
        self._run_id, resume_from = self._prepare_root(comm)
        started = time.monotonic()

        like: dict[str, Any] = {}

        def build_template(saved_world_size: int) -> tuple[dict[str, torch.Tensor], list[Any]]:
            like.update(self._state_tree(self._source_rank(saved_world_size)))
            return flatten(like)

        loaded = load_latest(comm, self.config.root, self._run_id, build_template=build_template,
                             resume_from=resume_from, pipeline_stages=self._registered.pipeline_stages)
        self._resumed = True
        if loaded is None:
            log.info("No complete checkpoint in %s; starting run %s from step 0.", self.config.root, self._run_id)
        else:
            self._apply_loaded(comm, *loaded, like=like, resume_from=resume_from, started=started)
        self._check_disk_space(comm, loaded[0] if loaded else None)
        self._arm_deadline(comm)
        self._schedule.start(loaded[0].save_seconds if loaded else None)
        assert self._progress is not None
        self._progress.resumed(self.trainer.step, self.resumed_from)
        return self.trainer

    def _arm_deadline(self, comm: Comm) -> None:
        end = resolve_end_time(self.config.deadline, comm)
        if end is None:
            return
        deadline = Deadline(end, self.config.deadline_margin)
        assert self._agreement is not None
        self._agreement.deadline_due = lambda: deadline.due(
            self.last_save.seconds if self.last_save else None, self._step_seconds, self.config.check_every)
        log.info("The job ends at %s UTC; the ranks stop and save when less than the margin (at least %.0f s, "
                 "derived from the measured save and step times) is left.",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(end)), deadline.margin_seconds(None, None, 1))

    def _check_disk_space(self, comm: Comm, manifest: Manifest | None) -> None:
        """Fail at start when two checkpoints clearly do not fit in ckpt_dir. Collective."""
        if manifest is not None:
            lower = upper = manifest.total_bytes
        else:
            # DCP stores replicated (DDP) state once, so the largest rank bounds the size from
            # below and the sum over ranks from above.
            estimates = comm.all_gather_object(self._registered.estimate_bytes())
            lower = max(low for low, _high in estimates)
            upper = sum(high for _low, high in estimates)
        error = None
        if comm.rank == 0:
            try:
                check_disk_space(self.config.root, lower, upper, one_on_disk=manifest is not None)
            except ConfigError as err:
                error = str(err)
        error = comm.broadcast_object(error)
        if error:
            raise ConfigError(error)

    def _apply_loaded(self, comm: Comm, manifest: Manifest, sized: dict[str, torch.Tensor], *,
                      like: dict[str, Any], resume_from: Path | None, started: float) -> None:
        """Restore the loaded checkpoint into the registered objects."""
        _flat, leaves = flatten(like)
        tree = unflatten(sized, leaves, like)
        source = self._source_rank(manifest.world_size)
        rank_state = self._registered.load_state_tree(tree, source, self.trainer)
        self._saved_data = dict(rank_state["data"])
        if source == self.rank:
            self._pending_rng = rank_state["rng"]
        else:
            log.warning("The checkpoint has no state of rank %d (saved by %d ranks): its RNG keeps this process's "
                        "seeding, and schedulers, buffers and registered objects come from saved rank %d.",
                        self.rank, manifest.world_size, source)
        if manifest.world_size != comm.world_size and comm.rank == 0:
            log.warning("Resuming %d ranks from a checkpoint of %d ranks: model and optimizer are resharded by DCP; "
                        "the data position is redistributed by train() when the sampler allows it.",
                        comm.world_size, manifest.world_size)
        self._last_saved_step = manifest.step
        self.resumed_from = Path(resume_from) if resume_from else self.config.root / f"step_{manifest.step:09d}"
        if resume_from is not None and comm.rank == 0:
            set_aside_newer(self.config.root, self._run_id, manifest.step)
            record_resume_from(self.config.root, resume_from)
        log.info("Resumed from %s (step %d, %s, saved by %d ranks) in %.2f s.", self.resumed_from, manifest.step,
                 manifest.reason, manifest.world_size, time.monotonic() - started)
        if comm.rank == 0:
            warn_on_version_change(manifest, self.resumed_from)

    # -- step loop --------------------------------------------------------------

    def steps(self, max_steps: int) -> Iterator[int]:
        """Yield step numbers ``trainer.step + 1 .. max_steps``, deciding after each step.

        Step N counts as done when its loop body returns. Then the ranks agree
        on stopping, and periodic, preemption and final saves happen. Creating
        a DataLoader iterator draws from torch's global RNG, so prefer
        :meth:`train` over iterating a DataLoader yourself; only :meth:`train`
        re-creates a mid-epoch iterator with the generator states it had.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ConfigError(f"max_steps must be an integer of at least 0, got {max_steps!r}")
        self.resume()
        if self.trainer.step >= max_steps:
            log.info("Training already reached step %d of %d; nothing to do.", self.trainer.step, max_steps)
            return
        self._restore_pending_rng()

        while self.trainer.step < max_steps:
            step = self.trainer.step + 1
            CONTEXT.step = step
            self._in_step = step
            step_started = time.monotonic()
            try:
                yield step
            except GeneratorExit:
                # A break left the body of this step at an unknown point.
                self._abandoned_step = step
                raise
            self._in_step = None
            self.trainer.step = step
            assert self._progress is not None
            self._progress.step_done(step)
            self._check_grace_period(step, time.monotonic() - step_started)
            if self._after_step(step, max_steps):
                break
        assert self._agreement is not None
        self._agreement.drain()

    def train(self, loader: DataLoader, max_steps: int) -> Iterator[tuple[int, Any]]:
        """Yield ``(step, batch)`` pairs, resuming the data position exactly.

        Epochs roll over automatically. With :class:`resilient.ResumableSampler`
        the consumed part of an epoch is skipped without loading it; with any
        other sampler those batches are loaded and dropped.
        """
        self.resume()
        stream = BatchStream(loader, self.trainer.epoch, self.trainer.batch_in_epoch,
                             stop_signals=tuple(int(sig) for sig in self.recorder.signals))
        self._stream = stream
        if self.trainer.batch_in_epoch > 0:
            # The interrupted run created this epoch's iterator before the saved
            # step RNG state was taken. Re-create it first, with the generator
            # states it was created with, and steps() then restores the step's RNG.
            stream.reopen_epoch(self._saved_data, self.config.data_on_resize)
        try:
            for step in self.steps(max_steps):
                batch = stream.next_batch()
                self.trainer.epoch = stream.epoch
                self.trainer.batch_in_epoch = stream.batch_in_epoch
                length = _batch_length(batch)
                self.trainer.samples_seen += length if length is not None else (loader.batch_size or 0)
                yield step, batch
        finally:
            stream.close()

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def _after_step(self, step: int, max_steps: int) -> bool:
        """Run the step-boundary decisions; return True when the loop must end."""
        assert self._agreement is not None and self._progress is not None
        self._collect_finished()
        if step >= max_steps:
            self._save_requested = None
            self._settle_background()
            if self._last_saved_step != step:
                self.save("final")
            self._progress.exiting(step, FINISHED)
            return True

        requested, self._save_requested = self._save_requested, None
        if self._agreement.forced != StopReason.NONE:
            # should_stop() already agreed on stopping inside this step.
            agreed = self._agreement.forced
        else:
            agreed = self._agreement.agree(step) if self._agreement.due(step) else StopReason.NONE
        if agreed != StopReason.NONE:
            self._stop(step, "deadline" if agreed == StopReason.DEADLINE else "preemption")
            return True

        if requested is not None:
            self._scheduled_save(step, requested)
        elif self.config.save_every and step % self.config.save_every == 0:
            self._scheduled_save(step, "periodic")
        elif self._agreement.save_agreed and self._time_save_still_due():
            self._scheduled_save(step, "periodic")
        return False

    def _stop(self, step: int, reason: str) -> None:
        """Save ``step`` unless the grace period is too short, then raise ``Preempted`` (or just return)."""
        assert self._progress is not None
        self._progress.stopping(step, reason)
        self._signal_at = self._first_signal_anywhere()
        self._resolve_background(step, reason)
        saved_step = step
        if self._last_saved_step != step:
            if reason == "preemption" and not self._save_fits_grace(step):
                saved_step = self._last_saved_step if self._last_saved_step is not None else 0
            else:
                self.save(reason)
        self.preempted = True
        self._progress.exiting(step, PREEMPTED)
        if self.config.exit_on_preemption:
            if saved_step == step:
                log.info("Exiting with status 75 after the %s checkpoint of step %d.", reason, step)
            else:
                log.info("Exiting with status 75 after step %d without a checkpoint of it; the newest is step %d.",
                         step, saved_step)
            raise Preempted(step, str(self.config.root / f"step_{saved_step:09d}"))

    # -- saving -------------------------------------------------------------------

    def request_save(self, reason: str = "manual") -> None:
        """Save a checkpoint when the current step completes.

        Call it inside the loop body, on every rank at the same step, because
        the save is collective. Preemption and final saves take precedence.
        """
        if reason not in REASONS:
            raise ValueError(f"invalid save reason {reason!r}; use one of {', '.join(REASONS)}")
        self._save_requested = reason

    def save(self, reason: str = "manual") -> SaveResult:
        """Save and commit a checkpoint of the current step. Collective.

        Returns once the completion marker is durable on disk. Raises
        ``CheckpointError`` on every rank when any rank fails.
        """
        if reason not in REASONS:
            raise ValueError(f"invalid save reason {reason!r}; use one of {', '.join(REASONS)}")
        if self._abandoned_step is not None:
            raise RuntimeError(
                f"save() after leaving the step loop with break during step {self._abandoned_step}: whether that "
                "step's update finished is unknown, so its checkpoint could repeat or skip it on resume. Let the "
                "loop end at max_steps, or call request_save() in the body of an earlier step."
            )
        if self._in_step is not None:
            raise RuntimeError(
                f"save() was called inside the loop body of step {self._in_step}, which has not finished. "
                "Call request_save() there to save once the step completes, or call save() outside the loop."
            )
        comm = self._connect()
        if not self._resumed:
            raise RuntimeError("call resume() (or start train()/steps()) before save()")
        assert self._run_id is not None and self._agreement is not None
        if self._background is not None:
            # One save at a time: a background save still being written finishes first.
            self._collect(self._background.wait(), raise_errors=reason in ("manual", "periodic"))
        self._agreement.drain()
        step = self.trainer.step
        if self.last_save is not None and self.last_save.step == step and self._last_saved_step == step:
            # For example save() after a loop that ended at max_steps: the final save contains this state.
            log.info("Step %d is already saved in %s; not saving it again.", step, self.last_save.path)
            return self.last_save
        assert self._progress is not None
        self._progress.saving(step)
        self._last_save_started_step = step
        result = save_checkpoint(
            comm, self.config.root, run_id=self._run_id, step=step, reason=reason,
            flatten_state=self._flatten_for_save, trainer=self.trainer.state_dict(), layout=self._registered.layout(),
        )
        self.last_blocking_seconds = result.seconds
        self._schedule.saved(result.seconds)
        self._record_commit(result)
        if comm.rank == 0:
            try:
                apply_retention(self.config.root, self._run_id, self.config.keep, committed_step=step)
            except (OSError, CheckpointError) as err:
                log.error("Retention after step %d failed: %s", step, err)
        return result

    def _record_commit(self, result: SaveResult) -> None:
        if self._last_saved_step is None or result.step >= self._last_saved_step:
            self._last_saved_step = result.step
        self.last_save = result
        assert self._progress is not None
        self._progress.committed(result.step, result.reason, result.total_bytes, result.seconds, result.path)
