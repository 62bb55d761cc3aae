import random

import numpy as np
import pytest
import torch

from vrwkv.engine.checkpoint import atomic_save, capture_rng_state, load_checkpoint, restore_rng_state


def test_atomic_save_roundtrip_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"w": torch.arange(3.0), "step": 7, "rng": capture_rng_state()}, path)
    atomic_save({"w": torch.arange(4.0), "step": 8, "rng": capture_rng_state()}, path)  # replace
    obj = load_checkpoint(path)  # weights_only=True inside
    assert obj["step"] == 8 and torch.equal(obj["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"step": 2, "bad": lambda: None}, path)  # unpicklable: fails mid-write
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="junk.pt cannot be loaded"):
        load_checkpoint(junk)


def test_rng_state_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    atomic_save(capture_rng_state(), tmp_path / "rng.pt")
    expected = random.random(), np.random.randn(3), torch.rand(3)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    got = random.random(), np.random.randn(3), torch.rand(3)
    assert expected[0] == got[0] and np.array_equal(expected[1], got[1]) and torch.equal(expected[2], got[2])
