"""One rank's state: its parts, and how they are captured and restored.

The state tree saved through DCP has two parts:

* ``model`` and ``optim``: from ``torch.distributed.checkpoint.state_dict``,
  keyed by fully qualified parameter names. Under DDP every rank has the same
  values under the same keys, and DCP stores one copy.
* ``ranks.<rank>``: what differs per rank (RNG, data position, counters,
  schedulers, grad scaler, user ``Stateful`` objects, and the model's buffers,
  such as BatchNorm statistics, which DDP lets drift apart per rank). The rank in the key keeps
  DCP from merging different values that share a key.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from resilient.errors import CheckpointLoadError


@runtime_checkable
class Stateful(Protocol):
    """Any object with ``state_dict()`` and ``load_state_dict(state)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class TrainerState:
    """Counters of the training loop, per rank.

    ``step`` counts completed optimizer steps. ``epoch`` and ``batch_in_epoch``
    are the data position: the batches of ``epoch`` this rank has consumed.
    ``samples_seen`` counts samples this rank has consumed since the run began.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("step", "epoch", "batch_in_epoch", "samples_seen"):
            setattr(self, name, int(state.get(name, 0)))


# -- RNG -------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Return the states of Python's, NumPy's and torch's global generators (CUDA when in use)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    # Keyed on availability, not initialisation, so the save and the resume
    # template agree even when CUDA is initialised later on one of them.
    # NOTE: this CUDA path has not run on a GPU machine yet.
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back generator states captured by :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- registered objects ------------------------------------------------------------


def _tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


@dataclass
class Registered:
    """The objects whose state a rank saves and restores."""

    model: nn.Module | None = None
    optimizers: Sequence[torch.optim.Optimizer] = ()
    schedulers: Sequence[Any] = ()
    scaler: Any = None
    stateful: Mapping[str, Stateful] = field(default_factory=dict)
    pipeline_stages: int | None = None

    def layout(self) -> dict[str, Any]:
        """Return the parallel layout: pipeline stages (as registered) and the device mesh of sharded parameters."""
        mesh_shape = None
        if self.model is not None:
            for parameter in self.model.parameters():
                mesh = getattr(parameter, "device_mesh", None)
                if mesh is not None:
                    mesh_shape = list(mesh.shape)
                    break
        return {"pipeline_stages": self.pipeline_stages, "mesh_shape": mesh_shape}

    def validate(self) -> None:
        if self.pipeline_stages is not None and (isinstance(self.pipeline_stages, bool)
                                                 or not isinstance(self.pipeline_stages, int)
                                                 or self.pipeline_stages < 1):
            raise ValueError(f"pipeline_stages must be an integer of at least 1, got {self.pipeline_stages!r}")
        if self.optimizers and self.model is None:
            raise ValueError("optimizers were registered without a model; pass model= as well")
        for name, obj in self.stateful.items():
            if not isinstance(obj, Stateful):
                raise TypeError(f"stateful object {name!r} ({type(obj).__name__}) lacks state_dict() and "
                                "load_state_dict(); implement both or wrap it")

    def model_and_optim(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        model_state, optim_state = get_state_dict(self.model, list(self.optimizers))
        tree: dict[str, Any] = {"model": model_state}
        if self.optimizers:
            tree["optim"] = optim_state
        return tree

    def load_model_and_optim(self, tree: Mapping[str, Any]) -> None:
        if self.model is None:
            return
        set_state_dict(self.model, list(self.optimizers), model_state_dict=tree["model"],
                       optim_state_dict=tree.get("optim", {}))

    def estimate_bytes(self) -> tuple[int, int]:
        """Return a lower and an upper bound of this rank's model and optimizer state in bytes.

        Uses ``state_dict()`` only, because ``get_state_dict`` would initialise an
        empty optimizer with a zero-gradient step, which counts as a step for Adam.
        Before the first step the optimizer state is empty; Adam-like optimizers
        then add up to two moments per parameter, which only the upper bound counts.
        """
        if self.model is None:
            return 0, 0
        certain = sum(_tensor_bytes(value) for value in self.model.state_dict().values())
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                certain += sum(_tensor_bytes(value) for value in state.values())
        parameters = sum(_tensor_bytes(parameter) for parameter in self.model.parameters())
        return certain, certain + 2 * parameters * len(self.optimizers)

    def split_buffers(self, model_state: dict[str, Any]) -> dict[str, Any]:
        """Remove the model's buffers from ``model_state`` and return them.

        Buffers such as BatchNorm running statistics differ per rank under DDP,
        so they are saved per rank. Under the shared keys, DCP would store one
        rank's values for all ranks. Buffers are found by storage, not by name,
        because ``get_state_dict`` renames keys of wrapped modules.
        """
        if self.model is None:
            return {}
        storages = {buffer.untyped_storage().data_ptr() for buffer in self.model.buffers()
                    if buffer.untyped_storage().data_ptr() != 0}
        keys = [key for key, value in model_state.items()
                if isinstance(value, torch.Tensor) and not hasattr(value, "device_mesh")
                and value.untyped_storage().data_ptr() in storages]
        return {key: model_state.pop(key) for key in keys}

    def state_tree(self, rank: int, trainer: TrainerState, data: Mapping[str, Any]) -> dict[str, Any]:
        """Return everything this rank saves: shared model and optimizer state, and ``ranks.<rank>``.

        To load at another world size, ``rank`` names the saved rank whose per-rank state is read.
        """
        tree = self.model_and_optim()
        rank_state = self.rank_state(trainer, data)
        rank_state["buffers"] = self.split_buffers(tree["model"]) if "model" in tree else {}
        # Hyperparameters and the parameter names of each group differ per pipeline
        # stage, and DCP would keep one rank's copy, so they are saved per rank.
        rank_state["param_groups"] = tree["optim"].pop("param_groups") if "optim" in tree else []
        tree["ranks"] = {str(rank): rank_state}
        return tree

    def load_state_tree(self, tree: dict[str, Any], rank: int, trainer: TrainerState) -> dict[str, Any]:
        """Restore a tree built like :meth:`state_tree`, except the RNG; return this rank's part."""
        rank_state = tree["ranks"][str(rank)]
        if "model" in tree:
            tree["model"].update(rank_state["buffers"])
        if "optim" in tree:
            tree["optim"]["param_groups"] = rank_state["param_groups"]
        self.load_model_and_optim(tree)
        self.load_rank_state(rank_state, trainer)
        return rank_state

    def rank_state(self, trainer: TrainerState, data: Mapping[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {
            "trainer": trainer.state_dict(),
            "data": dict(data),
            "rng": capture_rng(),
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_rank_state(self, state: Mapping[str, Any], trainer: TrainerState) -> None:
        """Restore everything of one rank except the RNG, which the caller restores at the right moment."""
        trainer.load_state_dict(state["trainer"])
        if len(state["schedulers"]) != len(self.schedulers):
            raise CheckpointLoadError(
                f"the checkpoint has state for {len(state['schedulers'])} LR schedulers but "
                f"{len(self.schedulers)} are registered; register the same schedulers as the run that saved it"
            )
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        for name, obj in self.stateful.items():
            obj.load_state_dict(state["stateful"][name])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
