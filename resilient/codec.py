"""Flatten nested state into ``{key: tensor}`` for DCP, with non-tensor parts stored as JSON.

DCP pickles non-tensor values and unpickles them with ``weights_only=False`` on
load, so a crafted checkpoint could run code. Here every subtree that contains no
tensor is encoded as UTF-8 JSON inside a ``uint8`` tensor, and tensors are
loaded by DCP with ``weights_only=True``. The JSON keeps tuples, non-string dict
keys and non-finite floats distinct, so values round-trip exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

_TUPLE = "__tuple__"
_DICT = "__dict__"
_FLOAT = "__float__"

Path = tuple[Any, ...]


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, np.generic):
        # np.float64 subclasses float and would load as a Python float, which
        # NumPy 2 promotes differently (float32 array * np.float64 is float64,
        # float32 array * float stays float32), so a resumed run could diverge.
        raise TypeError(
            f"cannot store state value at {where!r} of NumPy type {type(value).__name__}: it would load as a plain "
            "Python value, which NumPy promotes differently. Convert it with .item(), or store arrays as tensors."
        )
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {_FLOAT: repr(value)}
    if isinstance(value, list):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
        return {_DICT: [[_to_json(k, where), _to_json(v, f"{where}.{k}")] for k, v in value.items()]}
    raise TypeError(
        f"cannot store state value at {where!r} of type {type(value).__name__}: resilient saves "
        "non-tensor state as JSON (None, bool, int, float, str, list, tuple, dict). Convert it in "
        "your state_dict(), for example to a tensor or a list."
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_from_json(item) for item in value[_TUPLE])
        if set(value) == {_DICT}:
            return {_from_json(k): _from_json(v) for k, v in value[_DICT]}
        if set(value) == {_FLOAT}:
            return float(value[_FLOAT])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def encode_object(value: Any, where: str = "value") -> torch.Tensor:
    """Encode a tensor-free value as JSON bytes in a 1-D ``uint8`` tensor."""
    data = json.dumps(_to_json(value, where), separators=(",", ":"), allow_nan=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_object(tensor: torch.Tensor) -> Any:
    """Decode a tensor produced by :func:`encode_object`."""
    return _from_json(json.loads(bytes(tensor.cpu().numpy().tobytes()).decode()))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


@dataclass(frozen=True)
class Leaf:
    """One flat entry: where it sits in the tree, its flat key, and whether it is JSON."""

    path: Path
    key: str
    is_json: bool


def flatten(tree: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[Leaf]]:
    """Flatten ``tree`` to ``{key: tensor}``; keys join the path with dots.

    Subtrees without tensors become one JSON leaf each. Tuples that contain
    tensors are not supported, because their shape could not be rebuilt.
    """
    flat: dict[str, torch.Tensor] = {}
    leaves: list[Leaf] = []

    def visit(path: Path, value: Any) -> None:
        key = ".".join(str(p) for p in path)
        if isinstance(value, torch.Tensor):
            leaf = Leaf(path, key, is_json=False)
            tensor = value
        elif not _holds_tensor(value):
            leaf = Leaf(path, key, is_json=True)
            tensor = encode_object(value, key)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(path + (k,), v)
            return
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(path + (i,), v)
            return
        else:
            raise TypeError(f"cannot store state value at {key!r}: a {type(value).__name__} that contains "
                            "tensors; use a list or a dict instead")
        if key in flat:
            raise ValueError(f"two state entries flatten to the same key {key!r}; rename one of them")
        flat[key] = tensor
        leaves.append(leaf)

    for top, value in tree.items():
        visit((top,), value)
    return flat, leaves


def unflatten(flat: Mapping[str, torch.Tensor], leaves: list[Leaf], like: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a tree shaped like ``like`` from ``flat``, decoding JSON leaves."""

    def copy_shape(value: Any) -> Any:
        if isinstance(value, Mapping) and _holds_tensor(value):
            return {k: copy_shape(v) for k, v in value.items()}
        if isinstance(value, list) and _holds_tensor(value):
            return [copy_shape(v) for v in value]
        return None

    tree: dict[str, Any] = {k: copy_shape(v) for k, v in like.items()}
    for leaf in leaves:
        value = flat[leaf.key]
        if leaf.is_json:
            value = decode_object(value)
        node: Any = tree
        for part in leaf.path[:-1]:
            node = node[part]
        node[leaf.path[-1]] = value
    return tree
