"""ResumableSampler: skipping within an epoch, and redistributing the rest over another world size."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from resilient import ResumableSampler

DATA = list(range(50))


def shards(world_size: int, epoch: int = 3, drop_last: bool = False) -> list[list[int]]:
    result = []
    for rank in range(world_size):
        sampler = DistributedSampler(DATA, num_replicas=world_size, rank=rank, seed=5, drop_last=drop_last)
        sampler.set_epoch(epoch)
        result.append(list(sampler))
    return result


def test_skip_matches_distributed_sampler() -> None:
    for rank, shard in enumerate(shards(4)):
        sampler = ResumableSampler(DATA, num_replicas=4, rank=rank, seed=5)
        sampler.set_epoch(3)
        sampler.skip(6)
        assert list(sampler) == shard[6:]
        assert len(sampler) == len(shard) - 6


@pytest.mark.parametrize("new_world", [2, 3, 4, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rest_of_epoch_split_once(new_world: int, drop_last: bool) -> None:
    consumed = [shard[:4] for shard in shards(4, drop_last=drop_last)]
    rest = []
    for rank in range(new_world):
        sampler = ResumableSampler(DATA, num_replicas=new_world, rank=rank, seed=5, drop_last=drop_last)
        sampler.set_epoch(3)
        sampler.resume_after(4, saved_world_size=4)
        rest.append(list(sampler))
        assert len(sampler) == len(rest[-1])

    seen = [index for part in consumed + rest for index in part]
    remaining = len(DATA) - 16
    if drop_last:
        assert len(seen) == len(set(seen)), "no sample twice"
        assert len(DATA) - len(set(seen)) == remaining % new_world
    else:
        assert set(seen) == set(DATA), "every sample at least once"
        assert len(seen) - len(DATA) == (-remaining) % new_world, "only padding repeats samples"
    assert len({len(part) for part in rest}) == 1, "every rank gets the same number of samples"


def test_set_epoch_clears_redistribution() -> None:
    sampler = ResumableSampler(DATA, num_replicas=2, rank=0, seed=5)
    sampler.set_epoch(3)
    sampler.resume_after(4, saved_world_size=4)
    sampler.set_epoch(4)

    assert list(sampler) == shards(2, epoch=4)[0]
