"""Build checkpoint directories by hand: data files with arbitrary bytes plus a real manifest.

Discovery, retention and the CLI read only names, manifests, file sizes and the
``.metadata`` pickle, so these directories need no DCP tensor data in them.
"""

from __future__ import annotations

import functools
import json
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from resilient.checkpoint.fsutil import checksum_file, write_json_atomic
from resilient.checkpoint.layout import MARKER_NAME, FileEntry, Manifest, checkpoint_name

RUN_ID = "run-a"


@functools.cache
def empty_dcp_metadata() -> bytes:
    """The ``.metadata`` DCP writes for an empty state dict, which verification unpickles."""
    from torch.distributed.checkpoint.metadata import Metadata

    return pickle.dumps(Metadata(state_dict_metadata={}, storage_data={}))


def default_files(step: int) -> dict[str, bytes]:
    return {".metadata": empty_dcp_metadata(), "__0_0.distcp": f"data of step {step}".encode()}


def write_checkpoint(
    root: Path,
    step: int,
    *,
    run_id: str = RUN_ID,
    reason: str = "periodic",
    files: Mapping[str, bytes] | None = None,
    marker: bool = True,
    name: str | None = None,
) -> Path:
    """Create ``root/step_<step>`` (or ``root/<name>``) with the given files and, unless ``marker`` is False, a manifest."""
    path = root / (name or checkpoint_name(step))
    path.mkdir(parents=True)
    entries = []
    for file_name, data in (default_files(step) if files is None else files).items():
        (path / file_name).write_bytes(data)
        entries.append(FileEntry(path=file_name, size=len(data), checksum=checksum_file(path / file_name), rank=0))
    if marker:
        manifest = Manifest(step=step, reason=reason, world_size=1, run_id=run_id, files=tuple(entries),
                            created_at=time.time(), save_seconds=0.25, trainer={"step": step})
        write_json_atomic(path / MARKER_NAME, manifest.to_json())
    return path


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load ``path/manifest.json``, let ``edit`` change the parsed JSON in place, and write it back."""
    marker = path / MARKER_NAME
    payload = json.loads(marker.read_text())
    edit(payload)
    marker.write_text(json.dumps(payload))
