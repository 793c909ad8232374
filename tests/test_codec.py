"""flatten/unflatten and the JSON encoding of tensor-free state."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from resilient.codec import decode_object, encode_object, flatten, unflatten

FLOATS = [0.1, 1 / 3, 2.0**53 + 2, 5e-324, 1.7976931348623157e308, -0.0, 0.0, float("inf"), float("-inf")]


def assert_same(actual: Any, expected: Any, where: str = "tree") -> None:
    """Compare two state trees: same types, equal tensors with equal dtypes, floats with the same repr."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{where}: tensor values differ"
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} is not nan"
        else:
            assert repr(actual) == repr(expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_same(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def sample_tree() -> dict[str, Any]:
    return {
        "model": {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "layer.bias": torch.zeros(2)},
        "optim": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), -0.5, dtype=torch.float64)},
                1: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, dtype=torch.bfloat16)},
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None,
                              "maximize": False, "amsgrad": True}],
        },
        "ranks": {
            "0": {
                "rng": {"python": (3, tuple(range(5)), None), "torch": torch.tensor([1, 2, 255], dtype=torch.uint8)},
                "floats": FLOATS + [float("nan")],
                "keys": {1: "int key", (2, 3): "tuple key", "__dunder": "str key that needs escaping", None: 0},
                "big_int": 2**80,
                "text": "päth\n\"quoted\"",
                "empty": {"list": [], "dict": {}, "tuple": ()},
            },
        },
        "mixed": [torch.tensor([7]), {"k": (1, 2.5)}, "s", None],
    }


def test_roundtrip_nested_tree() -> None:
    tree = sample_tree()

    flat, leaves = flatten(tree)
    rebuilt = unflatten(flat, leaves, like=sample_tree())

    assert_same(rebuilt, tree)


def test_roundtrip_negative_zero_sign() -> None:
    flat, leaves = flatten({"values": {"zero": -0.0}})
    rebuilt = unflatten(flat, leaves, like={"values": {}})

    assert math.copysign(1.0, rebuilt["values"]["zero"]) == -1.0


def test_flatten_keys_and_leaf_kinds() -> None:
    flat, leaves = flatten(sample_tree())

    kinds = {leaf.key: leaf.is_json for leaf in leaves}
    assert kinds == {
        "model.layer.weight": False,
        "model.layer.bias": False,
        "optim.state.0.step": False,
        "optim.state.0.exp_avg": False,
        "optim.state.1.step": False,
        "optim.state.1.exp_avg": False,
        "optim.param_groups": True,
        "ranks.0.rng.python": True,
        "ranks.0.rng.torch": False,
        "ranks.0.floats": True,
        "ranks.0.keys": True,
        "ranks.0.big_int": True,
        "ranks.0.text": True,
        "ranks.0.empty": True,
        "mixed.0": False,
        "mixed.1": True,
        "mixed.2": True,
        "mixed.3": True,
    }
    assert list(flat) == list(kinds)
    assert flat["ranks.0.floats"].dtype == torch.uint8
    assert flat["ranks.0.floats"].dim() == 1


def test_flatten_keeps_tensor_objects() -> None:
    weight = torch.ones(2)

    flat, _leaves = flatten({"model": {"weight": weight}})

    assert flat["model.weight"] is weight


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (np.int64(3), "int64"),
        (np.float64(1.5), "float64"),
        (np.float32(1.5), "float32"),
        (np.bool_(True), "bool"),
        ({1, 2}, "set"),
        (b"bytes", "bytes"),
    ],
)
def test_flatten_unsupported_type_names_path(value: Any, type_name: str) -> None:
    tree = {"ranks": {"0": {"weight": torch.zeros(1), "stateful": {"meter": {"values": [1, value]}}}}}

    with pytest.raises(TypeError) as raised:
        flatten(tree)

    assert "'ranks.0.stateful.meter.values[1]'" in str(raised.value)
    assert f"type {type_name}" in str(raised.value)


def test_flatten_tuple_with_tensor_rejected() -> None:
    with pytest.raises(TypeError) as raised:
        flatten({"model": {"pair": (torch.zeros(1), 1)}})

    assert "'model.pair'" in str(raised.value)


def test_flatten_duplicate_key_rejected() -> None:
    with pytest.raises(ValueError) as raised:
        flatten({"a": {"b": torch.zeros(1)}, "a.b": torch.ones(1)})

    assert "'a.b'" in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        "",
        [],
        {},
        (),
        FLOATS,
        (1, [2.5, None], {"x": float("-inf")}),
        {1: "a", 2.5: "b", (1, "x"): "c", False: "d", "__tuple__": "e", "__float__": "f"},
        [{"__dict__": 1}, {"plain": {"nested": (None,)}}],
    ],
    ids=lambda value: type(value).__name__,
)
def test_encode_decode_roundtrip(value: Any) -> None:
    encoded = encode_object(value)

    assert encoded.dtype == torch.uint8
    assert encoded.dim() == 1
    assert_same(decode_object(encoded), value)


def test_encode_decode_nan() -> None:
    decoded = decode_object(encode_object([float("nan")]))

    assert len(decoded) == 1
    assert math.isnan(decoded[0])


def test_encode_writes_strict_json() -> None:
    encoded = encode_object({"values": FLOATS + [float("nan")]})

    def reject_constant(name: str) -> None:
        raise AssertionError(f"encoded JSON contains the non-standard constant {name}")

    payload = json.loads(bytes(encoded.numpy()).decode(), parse_constant=reject_constant)
    assert payload["values"][0] == 0.1


def test_encode_unsupported_names_where() -> None:
    with pytest.raises(TypeError) as raised:
        encode_object({"outer": [object()]}, where="ranks.0.stateful")

    assert "'ranks.0.stateful.outer[0]'" in str(raised.value)
