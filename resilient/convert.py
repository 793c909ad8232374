"""Convert between a resilient (DCP) checkpoint and one ``torch.save`` file.

A file contains ``{"format": "resilient-flat", "format_version": 1, "step", "world_size", "run_id",
"json_keys", "state"}``, where ``state`` maps every flat checkpoint key to a tensor or, for
the keys in ``json_keys``, to the decoded Python value. ``torch.load(path, weights_only=True)``
reads it. With ``model_only`` the file is a plain model ``state_dict`` (parameters and rank 0's
buffers) that ``module.load_state_dict`` accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from resilient.checkpoint.commit import publish, report_files
from resilient.checkpoint.fsutil import fsync_dir
from resilient.checkpoint.layout import (
    Manifest,
    checkpoint_name,
    current_versions,
    new_run_id,
    read_manifest,
    read_run_id,
    staging_name,
    write_run_id,
)
from resilient.checkpoint.load import verify_checksums
from resilient.checkpoint.safe_reader import SafeFileSystemReader
from resilient.codec import decode_object, encode_object
from resilient.errors import CheckpointLoadError, describe_failure

FILE_FORMAT = "resilient-flat"
FILE_FORMAT_VERSION = 1
_BUFFERS_OF_RANK0 = "ranks.0.buffers."

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group, which is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_checkpoint(path: Path, *, model_only: bool = False,
                    progress: Progress = _stderr_progress) -> tuple[Manifest, dict[str, Any]]:
    """Verify a committed checkpoint and return its manifest and flat state, JSON keys decoded."""
    manifest = read_manifest(path)
    total = manifest.total_bytes
    progress(f"verifying {len(manifest.files)} files ({total / 1e6:.1f} MB) of {path}")
    problems = verify_checksums(path, manifest)
    if problems:
        raise CheckpointLoadError(f"checkpoint {path} failed verification: {'; '.join(problems)}")

    metadata = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    template: dict[str, torch.Tensor] = {}
    for key, stored in metadata.items():
        if model_only and not (key.startswith("model.") or key.startswith(_BUFFERS_OF_RANK0)):
            continue
        if not isinstance(stored, TensorStorageMetadata):
            raise CheckpointLoadError(f"checkpoint {path}: entry {key!r} is not a tensor, so resilient did not "
                                      "write it; only resilient checkpoints can be converted")
        template[key] = torch.empty(stored.size, dtype=stored.properties.dtype)
    progress(f"loading {len(template)} entries")
    try:
        with _single_process():
            dcp.load(template, storage_reader=SafeFileSystemReader(path))
    except CheckpointException as err:  # derives from BaseException, so wrap it in an ordinary error
        raise CheckpointLoadError(f"loading checkpoint {path} failed: {describe_failure(err)}") from err
    json_keys = set(manifest.json_keys)
    state = {key: decode_object(value) if key in json_keys else value for key, value in template.items()}
    return manifest, state


def model_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return a module ``state_dict``: the ``model.`` keys plus rank 0's buffers."""
    result = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    result.update({key[len(_BUFFERS_OF_RANK0):]: value for key, value in state.items()
                   if key.startswith(_BUFFERS_OF_RANK0)})
    return result


def checkpoint_to_file(src: Path, dst: Path, *, model_only: bool = False,
                       progress: Progress = _stderr_progress) -> None:
    """Write checkpoint ``src`` as one ``torch.save`` file at ``dst`` (atomically)."""
    manifest, state = read_checkpoint(src, model_only=model_only, progress=progress)
    if model_only:
        payload: Any = model_state_dict(state)
    else:
        payload = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "step": manifest.step,
                   "world_size": manifest.world_size, "run_id": manifest.run_id,
                   "json_keys": sorted(manifest.json_keys), "state": state}
    progress(f"writing {dst}")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_to_safetensors(src: Path, dst: Path, *, progress: Progress = _stderr_progress) -> None:
    """Write the model weights of checkpoint ``src`` as a safetensors file."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("error: --safetensors needs the safetensors package; install it with "
                         "`pip install safetensors`") from None
    _manifest, state = read_checkpoint(src, model_only=True, progress=progress)
    weights = {key: value.contiguous() for key, value in model_state_dict(state).items()}
    progress(f"writing {dst}")
    save_file(weights, str(dst))


def file_to_checkpoint(src: Path, root: Path, *, progress: Progress = _stderr_progress) -> Path:
    """Write a file made by :func:`checkpoint_to_file` as a committed checkpoint under ``root``.

    The new checkpoint belongs to the run of ``root`` (a new run when ``root`` has none)
    and is marked with reason ``manual``. Returns its directory.
    """
    payload = torch.load(src, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise CheckpointLoadError(f"{src} is not a full resilient checkpoint file (format {FILE_FORMAT!r}); "
                                  "a --model-only file cannot be turned back into a checkpoint")
    if payload.get("format_version") != FILE_FORMAT_VERSION:
        raise CheckpointLoadError(f"{src} has format_version {payload.get('format_version')!r}; this resilient "
                                  f"reads {FILE_FORMAT_VERSION}")
    json_keys = set(payload["json_keys"])
    flat = {key: encode_object(value, key) if key in json_keys else value for key, value in payload["state"].items()}

    root.mkdir(parents=True, exist_ok=True)
    run_id = read_run_id(root)
    if run_id is None:
        run_id = new_run_id()
        write_run_id(root, run_id)
    step = int(payload["step"])
    final = root / checkpoint_name(step)
    staging = root / staging_name(step)
    staging.mkdir()
    progress(f"writing {len(flat)} entries to {staging}")
    started = time.monotonic()
    try:
        with _single_process():
            dcp.save(flat, storage_writer=dcp.FileSystemWriter(staging, single_file_per_rank=True, sync_files=True))
        files = tuple(report_files(staging, 0))
        fsync_dir(staging)
        manifest = Manifest(step=step, reason="manual", world_size=int(payload["world_size"]), run_id=run_id,
                            files=files, created_at=time.time(), save_seconds=time.monotonic() - started,
                            trainer={"step": step}, versions=current_versions(), json_keys=tuple(sorted(json_keys)))
        publish(staging, final, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"committed {final}")
    return final
