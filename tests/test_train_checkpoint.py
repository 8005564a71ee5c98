import json
import pickle
import shutil

import pytest
import torch

from fastvlp.models import E2EVLP, get_preset
from fastvlp.train import checkpoint as ckpt
from fastvlp.train.optim import build_optimizer
from fastvlp.train.schedule import build_scheduler
from fastvlp.train.state_files import load_state, save_state


def _small_model():
    config = get_preset("tiny", d_model=32, num_heads=2, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                        num_queries=3, vocab_size=40, num_classes=4, num_attributes=3)
    return E2EVLP(config)


def _trained(seed):
    torch.manual_seed(seed)
    model = _small_model()
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, 2, 10)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_state_files_round_trip_nested_values(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0], "name": "x", "fused": None, "lr": 1e-4}],
             "rng": torch.randint(0, 255, (16,), dtype=torch.uint8)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"] == state["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert torch.equal(back["rng"], state["rng"]) and back["rng"].dtype == torch.uint8
    with pytest.raises(TypeError, match="pickling"):
        save_state({"bad": object()}, tmp_path, "bad")


def test_checkpoint_round_trip_without_unpickling(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained(0)
    rng = ckpt.capture_rng_states()
    trainer = {"step": 1, "sampler": {"epoch": 0, "position": 4}}
    path = ckpt.write_checkpoint(
        tmp_path, 1, lambda d: ckpt.save_training_files(d, model, optimizer, scheduler, trainer, {"rank0": rng})
    )
    assert path == tmp_path / "checkpoints" / "step-1"

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must load without unpickling")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    torch.manual_seed(1)
    other, other_optimizer, other_scheduler = _trained(1)
    state = ckpt.load_training_files(path, other, other_optimizer, other_scheduler)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state_dict()["state"].values(), other_optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert other_scheduler.state_dict()["last_epoch"] == 1 and other_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert state.trainer == trainer
    torch.rand(5)
    ckpt.restore_rng_states(state.rng["rank0"])
    expected = torch.rand(7)
    torch.set_rng_state(rng["cpu"])
    assert torch.equal(torch.rand(7), expected)


def test_write_is_atomic_and_keep_last_prunes(tmp_path):
    def write(directory):
        (directory / "trainer_state.json").write_text("{}")

    for step in (2, 4, 6):
        ckpt.write_checkpoint(tmp_path, step, write, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-4", "step-6"]

    def failing(directory):
        (directory / "trainer_state.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.write_checkpoint(tmp_path, 8, failing, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6"]
    # a directory left by a crash mid-write is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step-9-1").mkdir()
    (tmp_path / "checkpoints" / "step-10").mkdir()  # no trainer state: incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-6"
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.write_checkpoint(tmp_path, 1, write, keep_last=0)
    with pytest.raises(FileNotFoundError, match="complete"):
        ckpt.load_training_files(tmp_path / "checkpoints" / "step-10", _small_model())


def test_what_interrupted_writes_left_is_cleared_and_complete_checkpoints_are_kept(tmp_path):
    def write(directory):
        (directory / "trainer_state.json").write_text(json.dumps({"weights": torch.randn(3).tolist()}))

    for step in (2, 4):
        ckpt.write_checkpoint(tmp_path, step, write)
    root = tmp_path / "checkpoints"
    before = {name: (root / name / "trainer_state.json").read_text() for name in ("step-2", "step-4")}
    # a write that died while filling its directory (its process is gone) ...
    (root / ".tmp-step-6-999999").mkdir()
    (root / ".tmp-step-6-999999" / "model.safetensors").write_bytes(b"partial")
    # ... one that died after putting its new step-4 in place, before deleting the old one ...
    shutil.copytree(root / "step-4", root / ".old-step-4-77")
    # ... and one that died between its two renames: the old step-8 is the only copy of step 8
    (root / ".old-step-8-78").mkdir()
    write(root / ".old-step-8-78")
    step8 = (root / ".old-step-8-78" / "trainer_state.json").read_text()
    # anything else in the folder is not a leftover of a write
    (root / "notes.txt").write_text("kept")

    ckpt.write_checkpoint(tmp_path, 6, write)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-2", "step-4", "step-6", "step-8"]
    assert {name: (root / name / "trainer_state.json").read_text() for name in before} == before
    assert (root / "step-8" / "trainer_state.json").read_text() == step8
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-4", "step-6", "step-8"]

    # an incomplete old copy (its deletion had begun) is deleted, never restored
    (root / ".old-step-10-79").mkdir()
    (root / ".tmp-step-12-80").mkdir()
    assert sorted(p.name for p in ckpt.remove_stale_writes(tmp_path)) == [".old-step-10-79", ".tmp-step-12-80"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-2", "step-4", "step-6", "step-8"]
    assert ckpt.remove_stale_writes(tmp_path / "no-run") == []
