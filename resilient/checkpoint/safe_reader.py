"""Read DCP checkpoints without running code that a crafted file carries.

DCP stores its ``.metadata`` file as a pickle and loads it with ``pickle.load``,
and it loads any entry that the metadata marks as bytes with
``torch.load(weights_only=False)``. Both run arbitrary code from the file. A
matching checksum does not help, because a crafted checkpoint comes with a
manifest written to match it.

:class:`SafeFileSystemReader` unpickles ``.metadata`` with an allowlist of the
classes DCP itself puts there. It rejects metadata that could make DCP read
outside the checkpoint or unpickle an entry. That costs nothing, because
resilient writes every entry as a tensor (see ``resilient.codec``) and DCP
loads tensors with ``weights_only=True``.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from resilient.errors import CheckpointLoadError

#: Everything a ``.metadata`` file written by DCP in torch 2.x refers to, by module.
#: dtypes (``torch.float32`` and so on) are allowed separately.
_ALLOWED: dict[str, dict[str, Any]] = {
    "torch.distributed.checkpoint.metadata": {
        name: getattr(dcp_metadata, name)
        for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo": _StorageInfo},
    "torch.serialization": {"_get_layout": torch.serialization._get_layout},
    "torch": {"Size": torch.Size},
    "pathlib": {name: getattr(pathlib, name)
                for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
    "collections": {"OrderedDict": collections.OrderedDict},
}


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint file contains something that resilient never writes, so loading it was rejected."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(module, {})
        if name in allowed:
            return allowed[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._where} refers to {module}.{name}, which DCP never writes into its metadata. resilient did "
            "not unpickle it, because loading it could run code from the file. Check where the checkpoint came "
            "from. Move it out of the checkpoint directory to keep it for inspection, delete it with "
            "`resilient clean DIR NAME --yes`, or resume from another checkpoint."
        )


def load_metadata(file: io.BufferedIOBase, where: str) -> dcp_metadata.Metadata:
    """Unpickle DCP metadata through the allowlist, then check its entries and file references."""
    try:
        metadata = _MetadataUnpickler(file, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a damaged pickle raises almost anything
        raise CheckpointLoadError(f"{where} is not readable DCP metadata ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{where} contains a {type(metadata).__name__} instead of DCP metadata")
    # The allowed classes can still be put together wrongly; DCP would then fail with any error.
    if not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointLoadError(f"{where} is not valid DCP metadata: its entry table is a "
                                  f"{type(metadata.state_dict_metadata).__name__}, not a dict")
    if not isinstance(metadata.storage_data, dict):
        raise CheckpointLoadError(f"{where} is not valid DCP metadata: its storage table is a "
                                  f"{type(metadata.storage_data).__name__}, not a dict")
    for key, stored in metadata.state_dict_metadata.items():
        if not isinstance(stored, dcp_metadata.TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{where}: entry {key!r} is stored as {type(stored).__name__}, but resilient writes every entry as "
                "a tensor, and DCP would unpickle this one with weights_only=False. Loading it was rejected."
            )
    for index, info in metadata.storage_data.items():
        _check_storage_info(info, where, index)
    return metadata


def check_storage_against_files(metadata: dcp_metadata.Metadata, sizes: dict[str, int], where: str) -> list[str]:
    """Return one message per storage entry that reads outside the data files listed in ``sizes``.

    ``sizes`` maps the manifest's data files (not ``.metadata``) to their sizes.
    An offset past the end of its file, or a reference to ``manifest.json``,
    would otherwise pass the checksums and fail only inside DCP's load.
    """
    problems = []
    for index, info in metadata.storage_data.items():
        size = sizes.get(str(info.relative_path))
        if size is None:
            problems.append(f"{where}: storage entry {index} reads {info.relative_path!r}, which is not a data file "
                            "listed in the manifest")
        elif not (isinstance(info.offset, int) and isinstance(info.length, int)) or info.offset < 0 \
                or info.length < 0 or info.offset + info.length > size:
            problems.append(f"{where}: storage entry {index} reads bytes {info.offset!r} to "
                            f"{info.offset!r}+{info.length!r} of {info.relative_path}, which has {size} bytes")
    return problems


def _check_storage_info(info: Any, where: str, index: Any) -> None:
    if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, _StorageInfo):
        raise UnsafeCheckpointError(f"{where}: storage entry {index} is a {type(info).__name__}, not _StorageInfo")
    relative = str(info.relative_path)
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith(("/", "\\")) or ".." in parts or "\\" in relative or ":" in relative:
        raise UnsafeCheckpointError(
            f"{where}: storage entry {index} points at {relative!r}, outside the checkpoint directory, where "
            "DCP writes only plain file names. Loading it was rejected."
        )
    if info.transform_descriptors:
        raise UnsafeCheckpointError(
            f"{where}: storage entry {index} requests transforms {list(info.transform_descriptors)!r}, which "
            "resilient never writes. Loading it was rejected."
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose metadata is unpickled through an allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file:
            metadata = load_metadata(file, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

