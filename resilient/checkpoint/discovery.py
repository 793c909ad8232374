"""Find checkpoints under a directory and classify each one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from resilient._logging import get_logger
from resilient.checkpoint.fsutil import directory_size
from resilient.checkpoint.layout import MARKER_NAME, Manifest, ManifestError, parse_dir_name, read_manifest

log = get_logger(__name__)

COMPLETE = "complete"
PARTIAL = "partial"
CORRUPT = "corrupt"
FOREIGN = "foreign"


@dataclass(frozen=True)
class CheckpointInfo:
    """Classification of one checkpoint directory: status, and the problem found if any."""

    path: Path
    step: int
    status: str
    problem: str | None = None
    manifest: Manifest | None = None

    @property
    def reason(self) -> str | None:
        return self.manifest.reason if self.manifest else None

    @property
    def world_size(self) -> int | None:
        return self.manifest.world_size if self.manifest else None


def _check_files(path: Path, manifest: Manifest) -> str | None:
    if not manifest.files:
        return "the manifest lists no files"
    for entry in manifest.files:
        file = path / entry.path
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            return f"file {entry.path} listed in the manifest is missing"
        except OSError as err:
            return f"file {entry.path} cannot be read: {err}"
        if size != entry.size:
            return f"file {entry.path} has {size} bytes, the manifest says {entry.size}"
    return None


def inspect(path: Path, run_id: str | None = None) -> CheckpointInfo | None:
    """Classify one directory, or return None when its name is not a checkpoint name."""
    parsed = parse_dir_name(path.name)
    if parsed is None or not path.is_dir():
        return None
    step, kind = parsed
    if kind != "final":
        description = {
            "tmp": "staging directory of an unfinished save",
            "deleting": "directory left by an interrupted deletion",
            "superseded": "set aside by a roll-back to an older checkpoint or by a second save of this step",
            "corrupt": "set aside after failing checksum verification on resume",
        }[kind]
        return CheckpointInfo(path, step, PARTIAL, description)

    if not (path / MARKER_NAME).exists():
        return CheckpointInfo(path, step, PARTIAL, f"no {MARKER_NAME} completion marker")
    try:
        manifest = read_manifest(path)
    except (ManifestError, OSError) as err:
        return CheckpointInfo(path, step, CORRUPT, f"unreadable {MARKER_NAME}: {err}")
    if manifest.step != step:
        return CheckpointInfo(path, step, CORRUPT, f"the manifest says step {manifest.step}", manifest)
    problem = _check_files(path, manifest)
    if problem:
        return CheckpointInfo(path, step, CORRUPT, problem, manifest)
    if run_id is not None and manifest.run_id != run_id:
        return CheckpointInfo(path, step, FOREIGN,
                              f"written by run {manifest.run_id}, this directory belongs to run {run_id}", manifest)
    return CheckpointInfo(path, step, COMPLETE, None, manifest)


def scan(root: Path, run_id: str | None = None) -> list[CheckpointInfo]:
    """Classify every checkpoint-named directory directly under ``root``, oldest step first."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        info = inspect(Path(entry.path), run_id)
        if info is not None:
            found.append(info)
    found.sort(key=lambda info: (info.step, info.status != COMPLETE, info.path.name))
    return found


def iter_complete_newest_first(root: Path, run_id: str | None, *, log_skips: bool = True) -> Iterator[CheckpointInfo]:
    """Yield the complete checkpoints of ``run_id``, newest first, inspecting directories only as needed.

    Names are sorted by step first, so finding the newest complete checkpoint
    reads one or two manifests however many directories there are. Every
    directory newer than the newest complete one that is skipped gets one log
    line saying why, since those are the ones a user would expect to resume.
    """
    try:
        names = [entry.name for entry in os.scandir(root)]
    except FileNotFoundError:
        return
    # Newest step first; at equal steps the final name before staging and set-aside ones.
    ordered = sorted(((parsed[0], parsed[1] != "final", name) for name in names
                      if (parsed := parse_dir_name(name)) is not None), key=lambda item: (-item[0], item[1], item[2]))
    found_one = False
    newest = -1
    for _step, _not_final, name in ordered:
        info = inspect(root / name, run_id)
        if info is None:
            continue
        if info.status == COMPLETE:
            if not found_one:
                found_one, newest = True, info.step
            yield info
        elif log_skips and (not found_one or info.step >= newest):
            log.warning("Skipping %s (%s): %s.", info.path, info.status, info.problem)


def complete_newest_first(root: Path, run_id: str | None, *, log_skips: bool = True) -> list[CheckpointInfo]:
    """Return all complete checkpoints of ``run_id``, newest first (see :func:`iter_complete_newest_first`)."""
    return list(iter_complete_newest_first(root, run_id, log_skips=log_skips))


def size_on_disk(info: CheckpointInfo) -> int:
    return directory_size(info.path)
