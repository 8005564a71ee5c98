"""SeededSamples: an item's randomness depends on (seed, epoch, index) only, and no generator of the caller's
is touched (the CPU one is restored, the device ones are never seeded)."""
import pytest
import torch
from torch.utils.data import Dataset

from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.train.seeded_samples import SeededSamples


class RandomDraws(Dataset):
    """Each item is three draws from the global CPU generator; ``unreadable`` indices are skipped records."""

    def __init__(self, size=5, unreadable=()):
        self.size, self.unreadable = size, set(unreadable)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index in self.unreadable:
            return SkippedSample(index, "unreadable_image", f"image-{index}.jpg")
        return {"index": index, "draws": torch.rand(3)}


def test_items_depend_on_seed_epoch_and_index_only():
    samples = SeededSamples(RandomDraws(), seed=7)
    first = samples[(0, 2)]["draws"]
    samples[(0, 1)], samples[(3, 4)]  # other items in between change nothing
    assert torch.equal(samples[(0, 2)]["draws"], first)
    assert not torch.equal(samples[(1, 2)]["draws"], first)
    assert not torch.equal(SeededSamples(RandomDraws(), seed=8)[(0, 2)]["draws"], first)


def test_the_callers_generators_are_left_alone(monkeypatch):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)

    def device_seeded(*args, **kwargs):
        raise AssertionError("a device generator was seeded")

    for module in (torch.cuda, getattr(torch, "xpu", None), getattr(torch, "mtia", None)):
        if module is not None and hasattr(module, "manual_seed_all"):
            monkeypatch.setattr(module, "manual_seed_all", device_seeded)
    SeededSamples(RandomDraws(), seed=1)[(0, 3)]
    assert torch.equal(torch.rand(4), expected)


def test_an_unreadable_record_is_replaced_by_the_next_readable_one_and_listed():
    sample = SeededSamples(RandomDraws(unreadable={1, 2}), seed=0)[(0, 1)]
    assert sample["index"] == 3
    assert [(index, reason) for index, reason, _ in sample["skipped"]] == [(1, "unreadable_image"), (2, "unreadable_image")]
    with pytest.raises(RuntimeError, match="no record"):
        SeededSamples(RandomDraws(size=2, unreadable={0, 1}))[(0, 0)]
