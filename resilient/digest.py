"""A SHA-256 digest of model and optimizer state, to compare runs bit for bit."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict


def _update(digest: "hashlib._Hash", key: str, value: Any) -> None:
    digest.update(key.encode())
    digest.update(b"\0")
    if isinstance(value, torch.Tensor):
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, Mapping):
        digest.update(b"map")
        for sub_key in sorted(value, key=str):
            _update(digest, f"{key}.{sub_key}", value[sub_key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq:{len(value)}".encode())
        for index, item in enumerate(value):
            _update(digest, f"{key}[{index}]", item)
    else:
        digest.update(json.dumps(value, sort_keys=True, default=repr).encode())
    digest.update(b"\1")


def tree_digest(tree: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of a nested state tree, with keys visited in sorted order."""
    digest = hashlib.sha256()
    _update(digest, "", tree)
    return digest.hexdigest()


def state_digest(model: nn.Module, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = ()) -> str:
    """Return a SHA-256 hex digest of the full model and optimizer state.

    Keys are fully qualified parameter names (a DDP wrapper's ``module.`` prefix
    is removed), visited in sorted order, so two runs of the same model match
    exactly when every parameter, buffer, optimizer moment, step count and
    hyperparameter matches bit for bit. Collective when the model is sharded
    (FSDP), because sharded tensors are gathered; every rank must call it then.
    """
    optimizer_list = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    # get_state_dict initialises an empty optimizer state with a zero-gradient step(),
    # which Adam counts as a step. Clearing it again keeps a digest taken before the
    # first step from changing the training that follows.
    fresh = [optimizer for optimizer in optimizer_list if not optimizer.state]
    model_state, optim_state = get_state_dict(model, optimizer_list, options=StateDictOptions(full_state_dict=False))
    for optimizer in fresh:
        optimizer.state.clear()
    return tree_digest({"model": model_state, "optim": optim_state if optimizer_list else {}})
