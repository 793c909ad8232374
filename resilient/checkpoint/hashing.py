"""Checksum checkpoint files while DCP writes them, instead of reading them back afterwards.

``torch.distributed.checkpoint.FileSystemWriter`` opens every file through its
``fs`` object (a ``FileSystem``). A subclass of it wraps each stream opened
for writing, so the digest is updated with every byte handed to the file.
The save then checksums only files whose streams were not seen whole (a
seek, a partial write, or a DCP version that opens files another way), by
reading them back as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from torch.distributed.checkpoint.filesystem import FileSystem

from resilient.checkpoint.fsutil import CHECKSUM_ALGORITHM, new_digest


class _HashingWriter:
    """A binary stream that feeds everything written to it into a digest."""

    def __init__(self, raw: Any, algorithm: str) -> None:
        self._raw = raw
        self.digest = new_digest(algorithm)
        self.size = 0
        self.sequential = True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        written = self._raw.write(view)
        if written is None or written != view.nbytes:
            self.sequential = False
        else:
            self.digest.update(view)
            self.size += written
        return written

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self._raw.seek(*args)

    def __getattr__(self, name: str) -> Any:
        # tell, flush, fileno, close and the rest behave as on the file itself.
        return getattr(self._raw, name)

    def __enter__(self) -> "_HashingWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._raw.close()


class HashingFileSystem(FileSystem):
    """DCP's local file system that records a digest of every file it writes from start to end."""

    def __init__(self, algorithm: str = CHECKSUM_ALGORITHM) -> None:
        super().__init__()
        self.algorithm = algorithm
        #: Absolute path -> (hex digest, bytes written), for files written in one sequential pass.
        self.digests: dict[str, tuple[str, int]] = {}

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        key = os.path.abspath(path)
        self.digests.pop(key, None)
        with super().create_stream(path, mode) as stream:
            writer = _HashingWriter(stream, self.algorithm)
            yield writer
        if writer.sequential:
            self.digests[key] = (writer.digest.hexdigest(), writer.size)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        # DCP writes .metadata under a temporary name and renames it.
        recorded = self.digests.pop(os.path.abspath(path), None)
        if recorded is not None:
            self.digests[os.path.abspath(new_path)] = recorded

    def known_checksum(self, path: Path, size: int) -> str | None:
        """Return the recorded digest of ``path`` when it covers all ``size`` bytes, else None."""
        recorded = self.digests.get(os.path.abspath(path))
        if recorded is None or recorded[1] != size:
            return None
        return recorded[0]


def install(writer: Any) -> HashingFileSystem | None:
    """Make a ``FileSystemWriter`` hash while it writes; None when its file system is not the plain one."""
    current = getattr(writer, "fs", None)
    if type(current) is not FileSystem:
        return None
    hashing = HashingFileSystem()
    writer.fs = hashing
    return hashing
