"""Durable file operations: fsync, atomic JSON writes, checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHECKSUM_ALGORITHM = "sha256"
_CHUNK = 4 * 1024 * 1024


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (file creations and renames inside it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum_file(path: Path, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Return the hex digest of the file's bytes (SHA-256 unless ``algorithm`` names another hashlib one)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary name, fsync it, rename it over ``path``, fsync the directory.

    Readers see either no file or the whole file, never a prefix.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def directory_size(path: Path) -> int:
    """Return the total size in bytes of the regular files under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
