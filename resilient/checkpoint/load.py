"""Pick the newest complete checkpoint every rank agrees on, verify it, and load it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from resilient._logging import get_logger
from resilient.checkpoint.discovery import iter_complete_newest_first
from resilient.checkpoint.fsutil import checksum_file, checksum_supported
from resilient.checkpoint.layout import MARKER_NAME, Manifest, ManifestError, aside_name, parse_dir_name, read_manifest
from resilient.checkpoint.safe_reader import SafeFileSystemReader, check_storage_against_files, load_metadata
from resilient.codec import Leaf
from resilient.comm import Comm
from resilient.errors import CheckpointLoadError, describe_failure

log = get_logger(__name__)


def verify_checksums(path: Path, manifest: Manifest, rank: int = 0, world_size: int = 1) -> list[str]:
    """Check this rank's share of the files against the manifest; return one message per mismatch.

    File ``i`` is checked by rank ``i % world_size``, so together the ranks read
    each file once. Rank 0 also checks that ``.metadata`` contains only what DCP
    writes (see ``resilient.checkpoint.safe_reader``).
    """
    if not checksum_supported(manifest.checksum_algorithm):
        return [f"{path}: unknown checksum algorithm {manifest.checksum_algorithm!r} in the manifest"]
    problems = []
    if rank == 0 and ".metadata" not in {entry.path for entry in manifest.files}:
        # DCP would read an unlisted .metadata without any check.
        problems.append(f"{path}: the manifest does not list .metadata")
    for index, entry in enumerate(manifest.files):
        if index % world_size != rank:
            continue
        file = path / entry.path
        try:
            size = file.stat().st_size
            if size != entry.size:
                problems.append(f"{file}: size is {size} bytes, the manifest says {entry.size}")
                continue
            actual = checksum_file(file, manifest.checksum_algorithm)
        except OSError as err:
            problems.append(f"{file}: cannot be read ({err})")
            continue
        if actual != entry.checksum:
            problems.append(f"{file}: {manifest.checksum_algorithm} is {actual}, the manifest says {entry.checksum}")
    if rank == 0 and not any(".metadata" in problem for problem in problems):
        # Matching checksums prove nothing when one hand wrote the files and the manifest.
        try:
            with open(path / ".metadata", "rb") as file:
                metadata = load_metadata(file, str(path / ".metadata"))
            data_files = {entry.path: entry.size for entry in manifest.files
                          if entry.path not in (".metadata", MARKER_NAME)}
            problems.extend(check_storage_against_files(metadata, data_files, str(path / ".metadata")))
        except OSError as err:
            problems.append(f"{path / '.metadata'}: cannot be read ({err})")
        except CheckpointLoadError as err:
            problems.append(str(err))
    return problems


def _sized_template(path: Path, flat: dict[str, torch.Tensor], leaves: list[Leaf],
                    layout: str) -> dict[str, torch.Tensor]:
    """Check that the checkpoint has every key, and size JSON leaves as stored."""
    # DCP's .metadata file is a pickle: SafeFileSystemReader unpickles it through an allowlist.
    metadata = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    missing = sorted(key for key in flat if key not in metadata)
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointLoadError(
            f"checkpoint {path} has no state for {len(missing)} entries the running job expects ({listed}); "
            f"{layout}. It was written by a different model, optimizer, set of registered objects or parallel "
            "layout (pipeline stages cannot be redistributed over another number of ranks). Restart with the "
            "layout and objects of the run that wrote it, or start with a new checkpoint directory."
        )
    sized = dict(flat)
    for leaf in leaves:
        if leaf.is_json:
            stored = metadata[leaf.key]
            if not isinstance(stored, TensorStorageMetadata):
                raise CheckpointLoadError(f"checkpoint {path}: entry {leaf.key!r} is not stored as a tensor")
            sized[leaf.key] = torch.empty(stored.size, dtype=torch.uint8)
    return sized


def _candidates(comm: Comm, root: Path, run_id: str, resume_from: Path | None) -> Iterator[str]:
    """Yield the checkpoints to try, newest first, the same on every rank. Collective at each step.

    Rank 0 inspects directories lazily and broadcasts one candidate at a time,
    so the usual resume reads only the newest checkpoint's manifest.
    """
    source: Iterator[str] = iter(())
    if comm.rank == 0:
        source = iter([str(resume_from)]) if resume_from is not None else (
            str(info.path) for info in iter_complete_newest_first(root, run_id))
    while True:
        path = comm.broadcast_object(next(source, None) if comm.rank == 0 else None)
        if path is None:
            return
        yield path


def _set_aside_corrupt(paths: list[Path]) -> None:
    """Rename checkpoints that failed verification, so retention and later restarts skip them."""
    for path in paths:
        parsed = parse_dir_name(path.name)
        if parsed is None or parsed[1] != "final":
            continue
        aside = path.with_name(aside_name(parsed[0], "corrupt"))
        try:
            os.rename(path, aside)
        except OSError as err:
            log.error("Could not rename corrupt checkpoint %s: %s", path, err)
            continue
        log.warning("Renamed corrupt checkpoint %s to %s; its files are kept for inspection.", path, aside)


def load_latest(
    comm: Comm,
    root: Path,
    run_id: str,
    *,
    build_template: Callable[[int], tuple[dict[str, torch.Tensor], list[Leaf]]],
    resume_from: Path | None = None,
    pipeline_stages: int | None = None,
) -> tuple[Manifest, dict[str, torch.Tensor]] | None:
    """Load the newest complete checkpoint that verifies. Collective.

    Rank 0 lists the candidates and broadcasts them, so every rank tries the
    same checkpoints in the same order even when a shared filesystem shows
    ranks different views. A candidate whose files fail their checksums is
    skipped with an error naming the files, and the next older one is tried.
    Once one loads, rank 0 renames the skipped ones to ``.corrupt-`` names.

    ``build_template`` receives the world size that wrote the checkpoint and
    returns the flat state to load into. Returns None when there is no
    checkpoint at all. Raises
    CheckpointLoadError when checkpoints exist but none verifies, or when
    ``resume_from`` does not verify, rather than silently starting from step 0.
    """
    candidates = _candidates(comm, root, run_id, resume_from)
    corrupt: list[Path] = []
    text = next(candidates, None)
    while text is not None:
        path = Path(text)
        problems: list[str] = []
        manifest: Manifest | None = None
        try:
            manifest = read_manifest(path)
            problems = verify_checksums(path, manifest, comm.rank, comm.world_size)
        except (OSError, ManifestError) as err:
            problems = [f"{path}: {err}"]
        all_problems = [p for rank_problems in comm.all_gather_object(problems) for p in rank_problems]
        if all_problems or manifest is None:
            corrupt.append(path)
            text = next(candidates, None)
            if comm.rank == 0:
                action = "trying the next older one" if text is not None else "no older one is left"
                log.error("Checkpoint %s is corrupt (%s): %s", path, action, "; ".join(all_problems))
            continue

        saved_stages = manifest.layout.get("pipeline_stages")
        if pipeline_stages is not None and saved_stages is not None and saved_stages != pipeline_stages:
            raise CheckpointLoadError(
                f"checkpoint {path} was saved with {saved_stages} pipeline stages on {manifest.world_size} ranks, "
                f"but this job runs {pipeline_stages} stages on {comm.world_size} ranks. Pipeline stages cannot be "
                f"resharded; restart with {saved_stages} stages, or convert the checkpoint with `resilient convert` "
                "and regroup its keys by hand."
            )
        flat, leaves = build_template(manifest.world_size)
        layout = f"it was saved by {manifest.world_size} ranks and this job runs {comm.world_size}"
        sized = _sized_template(path, flat, leaves, layout)
        try:
            with comm.quiet_single_process():
                dcp.load(sized, storage_reader=SafeFileSystemReader(path), process_group=comm.group)
        except CheckpointException as err:  # derives from BaseException, so wrap it in an ordinary error
            raise CheckpointLoadError(f"loading checkpoint {path} failed: {describe_failure(err)}") from err
        if comm.rank == 0 and resume_from is None:
            _set_aside_corrupt(corrupt)
        candidates.close()
        return manifest, sized

    if corrupt:
        names = ", ".join(str(path) for path in corrupt)
        raise CheckpointLoadError(
            f"no checkpoint could be verified ({names}); the errors above name each bad file. Repair or move "
            "them away to start over, or pass resume_from with a checkpoint that verifies."
        )
    return None
