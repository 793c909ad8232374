"""resilient: PyTorch training that survives preemption and resumes exactly.

Names are imported on first use, so ``resilient ls`` and other commands that
only read checkpoint directories start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "StopReason": "resilient.agreement",
    "SaveResult": "resilient.checkpoint.commit",
    "CheckpointInfo": "resilient.checkpoint.discovery",
    "complete_newest_first": "resilient.checkpoint.discovery",
    "scan": "resilient.checkpoint.discovery",
    "Manifest": "resilient.checkpoint.layout",
    "read_manifest": "resilient.checkpoint.layout",
    "Config": "resilient.config",
    "ResumableSampler": "resilient.data",
    "state_digest": "resilient.digest",
    "init_process_group": "resilient.distributed",
    "tree_digest": "resilient.digest",
    "EXIT_PREEMPTED": "resilient.errors",
    "AgreementError": "resilient.errors",
    "CheckpointError": "resilient.errors",
    "CheckpointLoadError": "resilient.errors",
    "ConfigError": "resilient.errors",
    "Preempted": "resilient.errors",
    "ResilientError": "resilient.errors",
    "SignalSetupError": "resilient.errors",
    "SignalRecorder": "resilient.signals",
    "Stateful": "resilient.state",
    "TrainerState": "resilient.state",
    "Supervisor": "resilient.supervisor",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resilient' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
