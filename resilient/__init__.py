"""resilient: PyTorch training that survives preemption and resumes exactly."""

from __future__ import annotations

__version__ = "0.1.0"

from resilient.agreement import StopReason
from resilient.checkpoint.commit import SaveResult
from resilient.checkpoint.discovery import CheckpointInfo, complete_newest_first, scan
from resilient.checkpoint.layout import Manifest, read_manifest
from resilient.config import Config
from resilient.data import ResumableSampler
from resilient.digest import state_digest, tree_digest
from resilient.errors import (
    EXIT_PREEMPTED,
    CheckpointError,
    CheckpointLoadError,
    ConfigError,
    Preempted,
    ResilientError,
    SignalSetupError,
)
from resilient.signals import SignalRecorder
from resilient.state import Stateful, TrainerState
from resilient.supervisor import Supervisor

__all__ = [
    "EXIT_PREEMPTED",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointLoadError",
    "Config",
    "ConfigError",
    "Manifest",
    "Preempted",
    "ResilientError",
    "ResumableSampler",
    "SaveResult",
    "SignalRecorder",
    "SignalSetupError",
    "Stateful",
    "StopReason",
    "Supervisor",
    "TrainerState",
    "__version__",
    "complete_newest_first",
    "read_manifest",
    "scan",
    "state_digest",
    "tree_digest",
]
