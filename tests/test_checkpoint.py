import os

import pytest
import torch

from sparsetrain.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip(tmp_path):
    state = {"format": 1, "w": torch.arange(5.0), "rng": torch.get_rng_state()}
    save_checkpoint(state, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["rng"], state["rng"])


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"format": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": 1, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"format": 1, "w": torch.randn(1000)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"c\.pt is corrupted or truncated"):
        load_checkpoint(path)
    assert path.read_bytes() == raw[: len(raw) // 2]  # left as it was, for inspection


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
