"""The fingerprints that detect one key saved with different values by different ranks."""

from __future__ import annotations

import pytest
import torch

from resilient.checkpoint.conflicts import describe_conflicts, find_conflicts, fingerprint, fingerprints


def test_fingerprint_equal_for_equal_tensors() -> None:
    assert fingerprint(torch.arange(5000.0)) == fingerprint(torch.arange(5000.0))


def test_fingerprint_sees_sampled_difference() -> None:
    other = torch.arange(5000.0)
    other[0] += 1

    assert fingerprint(torch.arange(5000.0)) != fingerprint(other)


def test_fingerprint_sees_dtype_and_shape() -> None:
    base = torch.zeros(4, 6)

    assert fingerprint(base) != fingerprint(base.double())
    assert fingerprint(base) != fingerprint(base.reshape(6, 4))
    assert fingerprint(torch.empty(0)) != fingerprint(torch.empty(0, 3))


def test_fingerprint_handles_bool_and_bfloat16() -> None:
    assert fingerprint(torch.ones(3, dtype=torch.bool)) != fingerprint(torch.zeros(3, dtype=torch.bool))
    assert fingerprint(torch.ones(3, dtype=torch.bfloat16)) != fingerprint(torch.zeros(3, dtype=torch.bfloat16))


def test_find_conflicts_groups_agreeing_ranks() -> None:
    per_rank = [
        {"shared": "a", "split": "x", "ranks.0.rng": "r0"},
        {"shared": "a", "split": "y", "ranks.1.rng": "r1"},
        {"shared": "a", "split": "x", "ranks.2.rng": "r2"},
    ]

    assert find_conflicts(per_rank) == {"split": [[0, 2], [1]]}


def test_find_conflicts_none_when_equal() -> None:
    prints = fingerprints({"w": torch.ones(3), "b": torch.zeros(2)})

    assert find_conflicts([prints, dict(prints)]) == {}


def test_describe_conflicts_names_keys_and_limit() -> None:
    conflicts = {f"model.{index}.weight": [[0], [1]] for index in range(10)}
    message = describe_conflicts(conflicts, limit=2)

    assert "10 state keys" in message
    assert "'model.0.weight' (ranks [0] vs [1])" in message
    assert "and 8 more" in message
    assert "pipeline-stage prefix" in message


@pytest.mark.parametrize("count", [2**24 + 3, 2**25, 2**25 + 1])
def test_fingerprint_of_tensors_beyond_float32_exact_integers(count: int) -> None:
    # Beyond 2**24, float32 cannot represent every index. Sampling positions computed in
    # float32 rounded count - 1 up to count and indexed past the end (seen at 2**27 floats).
    tensor = torch.zeros(count, dtype=torch.uint8)
    tensor[-1] = 7
    assert fingerprint(tensor) != fingerprint(torch.zeros(count, dtype=torch.uint8)), "the last element is sampled"
