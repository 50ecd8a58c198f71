"""The run folder survives bad --out paths, full disks and runs killed at any moment."""

import errno

import pytest
import torch

from nabla.checkpoint import io
from nabla.errors import CheckpointError, ConfigError
from nabla.training.config import TrainConfig
from nabla.training.rundir import STATE_FILE, prepare_out


def test_out_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file; name a folder"):
        prepare_out(TrainConfig(data=["x"]), f)
    with pytest.raises(ConfigError, match="cannot write to --out .*a-file/run"):
        prepare_out(TrainConfig(data=["x"]), f / "run")


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "consolidated.00.pth"
    io.atomic_torch_save({"w": torch.ones(2)}, target)

    def no_space(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"cannot write .*consolidated\.00\.pth \(No space left on device\); "
                                              "the file as it was before is intact"):
        io.atomic_torch_save({"w": torch.zeros(2)}, target)
    assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["consolidated.00.pth"]  # no temporary left


def test_stale_temporaries_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1}, out / STATE_FILE)
    (out / ".consolidated.00.pth.abc123.tmp").write_bytes(b"half a file")  # a save killed by SIGKILL
    (out / ".tokenizer.model.xyz.tmp").mkdir()  # tokenizer training killed
    assert prepare_out(TrainConfig(resume=True), out) == {"step": 1}
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE]


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)  # killed while tokenizing
    (out / ".tokenizer.model.xyz.tmp").mkdir()
    with pytest.raises(CheckpointError, match="stopped before the first checkpoint.*without --resume"):
        prepare_out(TrainConfig(resume=True), out)
    assert prepare_out(TrainConfig(data=["x"]), out) is None  # a plain rerun restarts cleanly
    assert list(out.iterdir()) == []
    (out / "notes.txt").write_text("mine")  # a folder with the user's own files is still refused
    with pytest.raises(ConfigError, match="exists and is not empty"):
        prepare_out(TrainConfig(data=["x"]), out)
