"""Detect state keys that several ranks save with different values.

DCP treats a key present on several ranks as one replicated value and writes
a single copy, without comparing the values. If the ranks' values differ (two
pipeline stages whose local modules both name a weight ``0.weight``, say),
every copy but one is lost silently. Before each save the ranks exchange a
fingerprint per key, and a save with such a key is rejected.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

#: Elements sampled per tensor. A full hash would read every byte of the model
#: at each save; values that differ between ranks by accident (other stages,
#: drifted buffers) differ almost everywhere, so a strided sample finds them.
SAMPLE_SIZE = 1024


def fingerprint(tensor: torch.Tensor) -> str:
    """Return a short hash of the tensor's dtype, shape and a strided sample of its elements."""
    values = tensor.detach()
    flat = values.reshape(-1)
    count = flat.numel()
    if count > SAMPLE_SIZE:
        # Integer positions: float32 linspace rounds count - 1 up to count beyond 2**24 elements.
        positions = torch.arange(SAMPLE_SIZE, dtype=torch.int64, device=flat.device) * (count - 1) // (SAMPLE_SIZE - 1)
        flat = flat[positions]
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{values.dtype}:{tuple(values.shape)}".encode())
    if flat.numel():
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprints(flat: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Fingerprint every plain tensor; sharded tensors (DTensor) legitimately differ per rank and are skipped."""
    return {key: fingerprint(value) for key, value in flat.items()
            if isinstance(value, torch.Tensor) and not hasattr(value, "device_mesh")}


def find_conflicts(per_rank: list[dict[str, str]]) -> dict[str, list[list[int]]]:
    """Return, per key with differing values, the groups of ranks that agree with each other."""
    by_key: dict[str, dict[str, list[int]]] = {}
    for rank, prints in enumerate(per_rank):
        for key, value in prints.items():
            by_key.setdefault(key, {}).setdefault(value, []).append(rank)
    return {key: sorted(groups.values()) for key, groups in sorted(by_key.items()) if len(groups) > 1}


def describe_conflicts(conflicts: dict[str, list[list[int]]], limit: int = 8) -> str:
    """Format conflicts as one message that names the keys, the ranks and the fix."""
    shown = [f"{key!r} (ranks {' vs '.join(str(group) for group in groups)})"
             for key, groups in list(conflicts.items())[:limit]]
    more = f" and {len(conflicts) - limit} more" if len(conflicts) > limit else ""
    return (
        f"{len(conflicts)} state keys have different values on different ranks: {', '.join(shown)}{more}. "
        "DCP would keep one copy of each and silently lose the others. Make such keys unique per rank, for "
        "example with the original fully qualified names or a pipeline-stage prefix, or register the object "
        "under `stateful` so it is saved per rank."
    )
