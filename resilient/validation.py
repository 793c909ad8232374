"""Checks of the running environment that a Config alone cannot make: free disk space, versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from resilient._logging import get_logger
from resilient.checkpoint.layout import Manifest
from resilient.errors import ConfigError
from resilient.units import human_bytes

log = get_logger(__name__)

#: Checkpoints that must fit on disk: the newest complete one is kept while the next is written.
CHECKPOINTS_ON_DISK = 2


def check_disk_space(root: Path, lower_bytes: int, upper_bytes: int, *, one_on_disk: bool = False) -> None:
    """Raise ConfigError when ``root`` clearly lacks room for two checkpoints; warn when it may.

    ``lower_bytes`` and ``upper_bytes`` bound the size of one checkpoint: the
    size is exact after a first save, and before it ranks may or may not hold
    replicated state that DCP stores once. With ``one_on_disk`` a complete
    checkpoint already takes its space, so room for one more is enough.
    """
    count = CHECKPOINTS_ON_DISK - 1 if one_on_disk else CHECKPOINTS_ON_DISK
    try:
        free = shutil.disk_usage(root).free
    except OSError as err:
        log.warning("Cannot read the free space of %s (%s); not checking that two checkpoints fit.", root, err)
        return
    needed = count * lower_bytes
    if free < needed:
        raise ConfigError(
            f"ckpt_dir {str(root)!r} has {human_bytes(free)} free, but this job needs at least {human_bytes(needed)} "
            "there, because the newest complete checkpoint stays while the next is written. Free space there "
            "or pass a ckpt_dir on a larger filesystem."
        )
    if free < count * upper_bytes:
        log.warning("%s has %s free; the next checkpoint needs between %s and %s, so a save may fail for lack "
                    "of space.", root, human_bytes(free), human_bytes(needed), human_bytes(count * upper_bytes))


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def warn_on_version_change(manifest: Manifest, path: Path) -> None:
    """Log a warning when the checkpoint was written by another torch minor version."""
    saved = manifest.versions.get("torch")
    if saved and _major_minor(saved) != _major_minor(torch.__version__):
        log.warning("Checkpoint %s was written by torch %s and is loaded by torch %s; DCP's format may differ "
                    "between minor versions.", path, saved, torch.__version__)
