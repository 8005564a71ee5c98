import pytest

from fastvlp.train.sampler import ResumableBatchSampler


def _draw(sampler, batches):
    out = []
    while len(out) < batches:
        for batch in sampler:
            out.append(batch)
            sampler.advance()
            if len(out) == batches:
                break
    return out


def test_same_seed_same_batches_other_seed_other_order():
    a = _draw(ResumableBatchSampler(23, 4, seed=7), 12)
    b = _draw(ResumableBatchSampler(23, 4, seed=7), 12)
    c = _draw(ResumableBatchSampler(23, 4, seed=8), 12)
    assert a == b and a != c
    first_epoch = [i for batch in a[:5] for i in batch]
    assert len(set(first_epoch)) == 20  # 5 full batches of distinct indices, the last 3 dropped
    assert a[:5] != a[5:10]  # every epoch is shuffled again


def test_mid_epoch_resume_continues_the_same_sequence():
    straight = ResumableBatchSampler(19, 3, seed=1)
    expected = _draw(straight, 11)
    first = ResumableBatchSampler(19, 3, seed=1)
    head = _draw(first, 4)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 12}
    resumed = ResumableBatchSampler(19, 3, seed=1)
    resumed.load_state_dict(dict(state))
    assert head + _draw(resumed, 7) == expected


def test_ranks_get_disjoint_equal_shards():
    shards = [ResumableBatchSampler(10, 2, seed=4, rank=r, world_size=3).epoch_indices(0) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    flat = [i for shard in shards for i in shard]
    assert set(flat) == set(range(10))  # every index is seen; 2 are repeated to pad to 12
    assert len(flat) - len(set(flat)) == 2


def test_invalid_arguments_and_states():
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(3, 4)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(10, 2, rank=2, world_size=2)
    sampler = ResumableBatchSampler(10, 4)
    with pytest.raises(ValueError, match="batch boundary"):
        sampler.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="epoch"):
        sampler.load_state_dict({"position": 0})
