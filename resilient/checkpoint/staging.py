"""Copy the state into host memory buffers that are reused from one save to the next.

A background save writes the copy while training changes the originals, so
the checkpoint contains exactly the values of the step it was taken at. The
buffers are kept between saves: after the first save, staging allocates
nothing for tensors whose shape and dtype did not change, and memory stays at
one copy of the state however many saves run.

torch's ``BlockingAsyncStager`` can also cache its buffers, but it assumes the
cached structure never changes. resilient stores JSON values (counters, RNG
seeds, sampler positions) as ``uint8`` tensors whose length changes from save
to save, so buffers are matched per key here and reallocated only for the keys
whose shape or dtype changed.
"""

from __future__ import annotations

from typing import Mapping

import torch

try:  # DTensor is what FSDP2 and tensor parallelism put in state dicts.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def _pin() -> bool:
    # NOTE: the pinned path has not run in resilient's tests, which have no CUDA device.
    return torch.cuda.is_available()


class StagingBuffers:
    """Host memory copies of a flat state dict, one buffer per key, reused between saves.

    Buffers are in page-locked (pinned) memory when CUDA is available, which
    makes the device-to-host copy faster. Copies are blocking: when
    :meth:`stage` returns, the originals may change.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        #: Bytes allocated for buffers since creation; stays flat once the state's shapes settle.
        self.allocated_bytes = 0

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def _buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=_pin())
            self._buffers[key] = buffer
            self.allocated_bytes += buffer.numel() * buffer.element_size()
        return buffer

    def stage(self, flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return host copies of ``flat``'s tensors; sharded tensors stay sharded over the same mesh."""
        staged: dict[str, torch.Tensor] = {}
        for key, value in flat.items():
            if DTensor is not None and isinstance(value, DTensor):
                local = value.to_local()
                buffer = self._buffer(key, local)
                buffer.copy_(local.detach())
                staged[key] = DTensor.from_local(buffer, value.device_mesh, value.placements, run_check=False,
                                                 shape=value.shape, stride=value.stride())
            elif isinstance(value, torch.Tensor):
                buffer = self._buffer(key, value)
                buffer.copy_(value.detach())
                staged[key] = buffer
            else:
                raise TypeError(f"state key {key!r} is a {type(value).__name__}, not a tensor; "
                                "flatten() should have encoded it")
        for stale in set(self._buffers) - set(flat):
            # Keys that left the state (an optimizer state that was reset, say) release their memory.
            del self._buffers[stale]
        return staged
