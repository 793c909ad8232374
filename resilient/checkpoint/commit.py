"""Coordinated save: every rank writes and fsyncs its files, then rank 0 commits.

The phases, each ending in a collective so that a failure on any rank reaches
every rank (or the group timeout fires) instead of leaving ranks waiting:

1. ``stage``: rank 0 creates the staging directory and broadcasts its name.
2. ``prepare``: each rank flattens its state; ranks exchange success flags
   and a fingerprint per key, and a key with different values on different
   ranks rejects the save (DCP would keep only one of them).
3. ``write``: ``torch.distributed.checkpoint.save`` into the staging directory.
   DCP gathers per-rank write errors and raises on every rank.
4. ``report``: each rank fsyncs its own files and checksums them; the reports
   are gathered on rank 0.
5. ``commit``: rank 0 checks that every rank reported, writes the manifest
   atomically, renames the staging directory to its final name and fsyncs the
   parent. The result is broadcast, so no rank returns before the commit.

Until step 5 renames the directory, nothing under a final name changes, so an
earlier complete checkpoint is never touched by a failed save.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from resilient._logging import get_logger
from resilient.checkpoint.conflicts import describe_conflicts, find_conflicts, fingerprints
from resilient.checkpoint.fsutil import checksum_file, fsync_dir, fsync_file, write_json_atomic
from resilient.checkpoint.hashing import HashingFileSystem
from resilient.checkpoint.hashing import install as install_hashing
from resilient.checkpoint.layout import (
    MARKER_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    aside_name,
    checkpoint_name,
    current_versions,
    read_manifest,
    staging_name,
)
from resilient.comm import Comm
from resilient.errors import CheckpointError, describe_failure, failures_by_rank
from resilient.units import human_bytes

log = get_logger(__name__)

#: Seconds each rank sleeps between writing its files and reporting them. A
#: test hook that widens the window in which a kill lands mid-save.
DEBUG_COMMIT_DELAY_ENV = "RESILIENT_DEBUG_COMMIT_DELAY"


class PublishGate:
    """Lets another thread abandon a background save up to the moment its marker is written.

    The committing rank calls :meth:`enter` right before publishing, and the
    thread that abandons the save calls :meth:`close`. Exactly one of them
    wins. A closed gate is never entered, and a gate being entered cannot be
    closed, so an abandoned save never appears complete and a published one
    is never reported as abandoned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "open"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def enter(self) -> bool:
        """Claim the right to publish; False when the save was abandoned."""
        with self._lock:
            if self._state == "closed":
                return False
            self._state = "publishing"
            return True

    def close(self) -> bool:
        """Abandon the save; False when it is already publishing or published."""
        with self._lock:
            if self._state == "publishing":
                return False
            self._state = "closed"
            return True


@dataclass(frozen=True)
class SaveResult:
    """A committed checkpoint: where it is and what the save cost."""

    path: Path
    step: int
    reason: str
    total_bytes: int
    seconds: float


def _debug_commit_delay() -> float:
    raw = os.environ.get(DEBUG_COMMIT_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return max(float(raw), 0.0)
    except ValueError:
        log.warning("Ignoring %s=%r: expected a number of seconds.", DEBUG_COMMIT_DELAY_ENV, raw)
        return 0.0


#: Below this much free space a failed write is put down to a full filesystem. torch's
#: archive writer reports a short write as "unexpected pos", without the errno.
NEARLY_FULL_BYTES = 64 * 2**20


def disk_full_hint(root: Path, err: BaseException) -> str:
    """Say so when a failed save looks like a full filesystem or quota; empty otherwise.

    Call it before the staging directory is removed, which frees space again.
    """
    try:
        free: int | None = shutil.disk_usage(root).free
    except OSError:
        free = None
    errnos = {getattr(exc, "errno", None) for _rank, exc in failures_by_rank(err)}
    if not errnos & {errno.ENOSPC, errno.EDQUOT} and (free is None or free >= NEARLY_FULL_BYTES):
        return ""
    left = f" ({human_bytes(free)} free)" if free is not None else ""
    return (f". The filesystem of {root} is full or over quota{left}: free space there, lower `keep`, or move "
            "ckpt_dir to a larger filesystem. The previous complete checkpoint is unchanged")


def _local_error(phase: str, err: BaseException, root: Path | None = None) -> str:
    hint = disk_full_hint(root, err) if root is not None else ""
    return f"{phase} failed: {describe_failure(err)}{hint}"


def _raise_if_any_failed(comm: Comm, phase: str, errors: list[str | None], staging: Path | None) -> None:
    """Raise CheckpointError on every rank if any rank reported an error in ``phase``."""
    failed = {rank: message for rank, message in enumerate(errors) if message}
    if not failed:
        return
    if comm.rank == 0 and staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    summary = "; ".join(f"rank {rank}: {message}" for rank, message in sorted(failed.items()))
    raise CheckpointError(f"checkpoint save aborted in the {phase} phase, no marker written ({summary})")


def report_files(staging: Path, rank: int, hashing: HashingFileSystem | None = None) -> list[FileEntry]:
    """fsync and checksum the files this rank wrote (and ``.metadata`` on rank 0).

    A digest that ``hashing`` recorded while the file was written is used
    instead of reading the file back.
    """
    names = sorted(name for name in os.listdir(staging) if name.startswith(f"__{rank}_"))
    if rank == 0 and (staging / ".metadata").exists():
        names.append(".metadata")
    entries = []
    for name in names:
        path = staging / name
        fsync_file(path)
        size = path.stat().st_size
        known = hashing.known_checksum(path, size) if hashing is not None else None
        entries.append(FileEntry(path=name, size=size, checksum=known or checksum_file(path), rank=rank))
    return entries


def publish(staging: Path, final: Path, manifest: Manifest) -> None:
    """Write the marker, then move the staging directory to its final name (rank 0 only)."""
    write_json_atomic(staging / MARKER_NAME, manifest.to_json())
    if final.exists():
        # The same step was saved before (for example after resuming from an
        # older checkpoint). Keep the old directory under another name rather
        # than deleting anything here, but never move another run's checkpoint.
        try:
            existing_run = read_manifest(final).run_id
        except (OSError, ManifestError):
            existing_run = None
        if existing_run is not None and existing_run != manifest.run_id:
            raise CheckpointError(
                f"{final} already contains a checkpoint of run {existing_run}; this run ({manifest.run_id}) will not "
                "move it. Use a separate ckpt_dir for each run."
            )
        aside = final.with_name(aside_name(manifest.step, "superseded"))
        os.rename(final, aside)
        log.warning("Moved the existing %s to %s before committing step %d again.", final, aside, manifest.step)
    os.rename(staging, final)
    fsync_dir(final.parent)


def save_checkpoint(
    comm: Comm,
    root: Path,
    *,
    run_id: str,
    step: int,
    reason: str,
    flatten_state: Callable[[], tuple[Mapping[str, torch.Tensor], list[str]]],
    trainer: Mapping[str, Any],
    layout: Mapping[str, Any] | None = None,
    gate: PublishGate | None = None,
) -> SaveResult:
    """Save and commit one checkpoint. Collective: every rank of ``comm`` must call it.

    When it returns, the checkpoint is durable and its marker exists on disk.
    On any failure every rank raises :class:`CheckpointError` and no marker exists.
    A ``gate`` closed before the commit abandons the save the same way.
    """
    started = time.monotonic()

    # Phase 1: stage.
    staging_or_error: tuple[str, str | None] = ("", None)
    if comm.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = root / staging_name(step)
            staging.mkdir()
            staging_or_error = (str(staging), None)
        except OSError as err:
            staging_or_error = ("", _local_error("creating the staging directory", err))
    staging_text, error = comm.broadcast_object(staging_or_error)
    if error:
        raise CheckpointError(f"checkpoint save of step {step} aborted: {error}")
    staging = Path(staging_text)

    # Phase 2: prepare.
    flat: Mapping[str, torch.Tensor] = {}
    json_keys: list[str] = []
    prints: dict[str, str] = {}
    error = None
    try:
        flat, json_keys = flatten_state()
        prints = fingerprints(flat) if comm.distributed else {}
    except Exception as err:  # noqa: BLE001 - reported to every rank below
        error = _local_error("collecting state", err)
        log.error("Collecting state for step %d failed:\n%s", step, traceback.format_exc())
    gathered = comm.all_gather_object((error, prints, json_keys))
    _raise_if_any_failed(comm, "prepare", [rank_error for rank_error, _, _ in gathered], staging)
    conflicts = find_conflicts([rank_prints for _, rank_prints, _ in gathered])
    all_json_keys = sorted({key for _, _, rank_keys in gathered for key in rank_keys})
    if conflicts:
        if comm.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"checkpoint save of step {step} rejected, no marker written: "
                              f"{describe_conflicts(conflicts)}")

    # Phase 3: write.
    hashing = None
    try:
        writer = dcp.FileSystemWriter(staging, single_file_per_rank=True, sync_files=True, thread_count=1)
        hashing = install_hashing(writer)
        with comm.quiet_single_process():
            dcp.save(dict(flat), storage_writer=writer, process_group=comm.group)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException derives from BaseException
        hint = disk_full_hint(root, err)
        if comm.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"checkpoint save of step {step} failed while writing, no marker written: "
                              f"{describe_failure(err)}{hint}") from err

    delay = _debug_commit_delay()
    if delay > 0:
        time.sleep(delay)

    # Phase 4: report.
    entries: list[FileEntry] = []
    error = None
    try:
        if gate is not None and gate.closed:
            # Abandoned: skip reading the files back; the commit below will not publish.
            error = "abandoned before it finished"
        else:
            entries = report_files(staging, comm.rank, hashing)
            fsync_dir(staging)
    except Exception as err:  # noqa: BLE001 - reported to every rank below
        error = _local_error("syncing and checksumming files", err, root)
    reports = comm.all_gather_object((entries, error))

    # Phase 5: commit on rank 0, result broadcast to every rank.
    outcome: tuple[int, str | None] = (0, None)
    if comm.rank == 0:
        outcome = _commit(root, staging, reports, run_id=run_id, step=step, reason=reason,
                          world_size=comm.world_size, trainer=trainer, started=started, json_keys=all_json_keys,
                          layout=dict(layout or {}, world_size=comm.world_size), gate=gate)
    total_bytes, error = comm.broadcast_object(outcome)
    if error:
        raise CheckpointError(f"checkpoint save of step {step} was not committed: {error}")

    result = SaveResult(root / checkpoint_name(step), step, reason, total_bytes, time.monotonic() - started)
    log.info("Committed checkpoint %s (%s, %.1f MB) in %.2f s.", result.path, reason, total_bytes / 1e6, result.seconds)
    return result


def _commit(root: Path, staging: Path, reports: list[Any], *, run_id: str, step: int, reason: str,
            world_size: int, trainer: Mapping[str, Any], started: float,
            json_keys: list[str], layout: dict[str, Any],
            gate: PublishGate | None = None) -> tuple[int, str | None]:
    failed = {rank: err for rank, (_entries, err) in enumerate(reports) if err}
    if len(reports) != world_size or failed:
        shutil.rmtree(staging, ignore_errors=True)
        missing = sorted(set(range(world_size)) - set(range(len(reports))))
        details = "; ".join([f"rank {rank}: {err}" for rank, err in sorted(failed.items())]
                            + ([f"no report from ranks {missing}"] if missing else []))
        return 0, details

    files = tuple(entry for entries, _err in reports for entry in entries)
    manifest = Manifest(step=step, reason=reason, world_size=world_size, run_id=run_id, files=files,
                        created_at=time.time(), save_seconds=time.monotonic() - started,
                        trainer=dict(trainer), versions=current_versions(), json_keys=tuple(json_keys),
                        layout=layout)
    if gate is not None and not gate.enter():
        shutil.rmtree(staging, ignore_errors=True)
        return 0, "abandoned before it finished; nothing was published"
    try:
        publish(staging, root / checkpoint_name(step), manifest)
    except Exception as err:  # noqa: BLE001 - every rank must hear about it through the broadcast
        log.error("Committing step %d failed: %s", step, err)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        return 0, _local_error("writing the completion marker", err, root)
    return manifest.total_bytes, None
