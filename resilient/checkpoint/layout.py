"""On-disk layout: directory names, the manifest (completion marker) and the run identity.

::

    CKPT_DIR/
      run.json                      run identity, written once by the first start
      journal.jsonl                 event journal (resilient.journal)
      .resilient/                   attempt counter, heartbeats and stacks of resilient run
      step_000000020/               a committed checkpoint
        manifest.json               completion marker, written last
        .metadata                   DCP metadata
        __0_0.distcp __1_0.distcp   DCP data, one or more files per rank
      step_000000030.tmp-<nonce>/   staging directory of a save in progress or abandoned
      step_000000040.corrupt-<nonce>/     set aside after it failed verification on resume
      step_000000050.superseded-<nonce>/  set aside by a roll-back or a second save of that step
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resilient.checkpoint.fsutil import CHECKSUM_ALGORITHM, write_json_atomic

MARKER_NAME = "manifest.json"
RUN_FILE = "run.json"
FORMAT_NAME = "resilient-checkpoint"
FORMAT_VERSION = 1

REASONS = ("periodic", "preemption", "deadline", "final", "manual")

_FINAL_RE = re.compile(r"^step_(\d+)$")
_OTHER_RE = re.compile(r"^step_(\d+)\.(tmp|deleting|superseded|corrupt)-([A-Za-z0-9]+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def staging_name(step: int) -> str:
    return f"{checkpoint_name(step)}.tmp-{secrets.token_hex(4)}"


def aside_name(step: int, kind: str) -> str:
    """Name for a directory moved out of the way before removal (``deleting``) or replacement."""
    return f"{checkpoint_name(step)}.{kind}-{secrets.token_hex(4)}"


def parse_dir_name(name: str) -> tuple[int, str] | None:
    """Return ``(step, kind)`` for a name this layout uses, else None.

    ``kind`` is ``final`` for a committed name, or ``tmp``, ``deleting``, ``superseded`` or ``corrupt``.
    """
    # fullmatch, because "$" in match() also accepts a trailing newline.
    match = _FINAL_RE.fullmatch(name)
    if match:
        return int(match.group(1)), "final"
    match = _OTHER_RE.fullmatch(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None


def resilient_version() -> str:
    from resilient import __version__

    return __version__


class ManifestError(ValueError):
    """A manifest is missing a field or has a field of the wrong type."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to the checkpoint directory."""

    path: str
    size: int
    checksum: str
    rank: int

    def validate(self) -> None:
        name = self.path
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".."):
            raise ManifestError(f"file path {name!r} points outside the checkpoint directory")
        if "\0" in name:
            raise ManifestError(f"file path {name!r} contains a NUL character")
        if self.size < 0:
            raise ManifestError(f"file {name!r} has negative size {self.size}")


@dataclass(frozen=True)
class Manifest:
    """The completion marker: its presence means every rank's files were durable."""

    step: int
    reason: str
    world_size: int
    run_id: str
    files: tuple[FileEntry, ...]
    created_at: float
    save_seconds: float
    trainer: dict[str, Any] = field(default_factory=dict)
    #: Parallel layout: ``world_size``, ``pipeline_stages`` and ``mesh_shape`` (None when unknown).
    layout: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    #: Keys whose uint8 tensor holds JSON-encoded non-tensor state (see resilient.codec).
    json_keys: tuple[str, ...] = ()
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["files"] = [asdict(entry) for entry in self.files]
        payload["total_bytes"] = self.total_bytes
        payload["created_at_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at))
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> "Manifest":
        if not isinstance(payload, dict):
            raise ManifestError(f"expected a JSON object, found {type(payload).__name__}")
        if payload.get("format") != FORMAT_NAME:
            raise ManifestError(f"format is {payload.get('format')!r}, expected {FORMAT_NAME!r}")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"format_version is {payload.get('format_version')!r}; this resilient reads version "
                f"{FORMAT_VERSION}. Use the resilient release that wrote it."
            )

        def need(name: str, kind: type | tuple[type, ...]) -> Any:
            if name not in payload:
                raise ManifestError(f"missing field {name!r}")
            value = payload[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ManifestError(f"field {name!r} has invalid value {value!r}")
            return value

        files = []
        for raw in need("files", list):
            if not isinstance(raw, dict):
                raise ManifestError(f"file entry {raw!r} is not an object")
            try:
                entry = FileEntry(path=str(raw["path"]), size=int(raw["size"]),
                                  checksum=str(raw["checksum"]), rank=int(raw["rank"]))
            except (KeyError, TypeError, ValueError, OverflowError) as err:
                raise ManifestError(f"file entry {raw!r} is invalid: {err}") from None
            entry.validate()
            files.append(entry)

        for name in ("trainer", "versions"):
            if payload.get(name) is not None and not isinstance(payload[name], dict):
                raise ManifestError(f"field {name!r} has invalid value {payload[name]!r}, expected an object")

        reason = need("reason", str)
        if reason not in REASONS:
            raise ManifestError(f"field 'reason' has unknown value {reason!r}")
        return cls(
            step=need("step", int),
            reason=reason,
            world_size=need("world_size", int),
            run_id=need("run_id", str),
            files=tuple(files),
            created_at=float(need("created_at", (int, float))),
            save_seconds=float(need("save_seconds", (int, float))),
            trainer=dict(payload.get("trainer") or {}),
            versions=dict(payload.get("versions") or {}),
            checksum_algorithm=need("checksum_algorithm", str),
            json_keys=_string_tuple(payload.get("json_keys", []), "json_keys"),
            layout=_mapping(payload.get("layout"), "layout"),
        )


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"field {name!r} must be an object, found {type(value).__name__}")
    return dict(value)


def _string_tuple(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ManifestError(f"field {name!r} must be a list of strings")
    return tuple(value)


def read_manifest(checkpoint: Path) -> Manifest:
    """Read and validate ``checkpoint/manifest.json``.

    Raises FileNotFoundError when there is no marker, and ManifestError when it
    does not parse or lacks a field.
    """
    marker = checkpoint / MARKER_NAME
    try:
        payload = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{marker} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{marker} is not UTF-8 text: {err}") from None
    return Manifest.from_json(payload)


def current_versions() -> dict[str, str]:
    import torch  # imported here so that listing checkpoints does not load torch

    return {
        "resilient": resilient_version(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


# -- run identity --------------------------------------------------------------


def read_run_id(root: Path) -> str | None:
    """Return the run id stored in ``root/run.json``, or None when there is none."""
    try:
        payload = json.loads((root / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ManifestError(f"{root / RUN_FILE} is unreadable ({err}); delete it to start a new run identity "
                            "or restore it from a backup") from None
    run_id = payload.get("run_id") if isinstance(payload, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise ManifestError(f"{root / RUN_FILE} has no valid 'run_id'")
    return run_id


def write_run_id(root: Path, run_id: str) -> None:
    write_json_atomic(root / RUN_FILE, {"run_id": run_id, "created_at": time.time()})


def resume_from_applied(root: Path, checkpoint: Path) -> float | None:
    """Return when an explicit ``resume_from`` of ``checkpoint`` was applied to this run, or None."""
    try:
        payload = json.loads((root / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    applied = payload.get("resume_from_applied") if isinstance(payload, dict) else None
    value = applied.get(str(checkpoint.resolve())) if isinstance(applied, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def record_resume_from(root: Path, checkpoint: Path) -> None:
    """Note in ``run.json`` that the run was resumed from ``checkpoint`` on request."""
    payload = json.loads((root / RUN_FILE).read_text())
    payload.setdefault("resume_from_applied", {})[str(checkpoint.resolve())] = time.time()
    write_json_atomic(root / RUN_FILE, payload)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
