"""``init_process_group`` that survives torchrun worker-group restarts.

torchrun (torch 2.13) keeps one TCP store, hosted by its agent, for all
worker-group restarts, and the workers' process groups use it without a
per-restart prefix. After ``torchrun --max-restarts`` restarts the group, gloo
can read a dead worker's address from the previous round and fail with
"Gloo connectFullMesh failed ... Connection refused". This happens without
resilient too, with c10d (``--standalone``) and static rendezvous alike.
Giving each restart its own key prefix avoids the stale keys.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

_DEFAULT_TIMEOUT = timedelta(minutes=10)


def init_process_group(backend: str | None = None, **kwargs: Any) -> None:
    """Call ``torch.distributed.init_process_group`` with a store of this torchrun restart's own.

    Outside torchrun's agent store, or when ``store`` or ``init_method`` is
    given, this is exactly ``torch.distributed.init_process_group``.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    uses_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not uses_agent_store or not restart.isdigit() or "store" in kwargs or "init_method" in kwargs:
        dist.init_process_group(backend, **kwargs)
        return
    timeout = kwargs.get("timeout") or _DEFAULT_TIMEOUT
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timeout)
    store = dist.PrefixStore(f"/resilient/restart_{restart}", agent_store)
    kwargs.setdefault("rank", int(os.environ["RANK"]))
    kwargs.setdefault("world_size", int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, store=store, **kwargs)
