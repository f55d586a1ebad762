"""Checkpoints: atomic writes, safe loading, configuration checks, run-directory bookkeeping."""

import errno
import os
import pickle

import pytest
import torch

from sdeflow.storage import checkpoints as ckpt

CONFIG = {"dataset": "cifar10", "net": {"preset": "small", "in_channels": 3, "channel_mult": [1, 2]}}


def _state(step=3, config=CONFIG):
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": config, "step": step,
            "model": {"w": torch.arange(6.0).reshape(2, 3)}, "ema": None, "optimizer": {}, "trainer": {}}


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state())
    state = ckpt.load_checkpoint(path, expected_config=CONFIG)
    assert state["step"] == 3
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_missing_file_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_truncated_file_refused(tmp_path, keep):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)


def test_garbage_and_foreign_files_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not an sdeflow checkpoint"):
        ckpt.load_checkpoint(foreign)


def test_other_configuration_refused_naming_the_difference(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state())
    other = {"dataset": "cifar10", "net": {"preset": "cifar10", "in_channels": 3, "channel_mult": [1, 2]}}
    with pytest.raises(ckpt.CheckpointError, match=r"net.preset: checkpoint has 'small', asked for 'cifar10'"):
        ckpt.load_checkpoint(path, expected_config=other)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / "code-ran"
    payload = _RunsCode()
    payload.target = str(marker)
    state = _state()
    state["model"] = {"w": payload}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=2)
    with pytest.raises(ckpt.CheckpointError, match="could run code"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state(3))
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device"):
        ckpt.save_checkpoint(path, _state(4))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_gives_clear_error(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state(3))
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="could not write"):
            ckpt.save_checkpoint(tmp_path / "ckpt-00000004.pt", _state(4))
    finally:
        tmp_path.chmod(0o700)
    assert ckpt.load_checkpoint(path)["step"] == 3


def test_listing_latest_prune_and_stale_temporaries(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    for step in (5, 20, 10, 15):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), _state(step))
    (tmp_path / ".ckpt-writing-abc.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("x")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 10, 15, 20]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000020.pt"
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt-00000005.pt", "ckpt-00000010.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20]
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [".ckpt-writing-abc.tmp"]
    with pytest.raises(ValueError, match="keep"):
        ckpt.prune_checkpoints(tmp_path, keep=0)


def test_directory_refusing_new_files_gives_clear_error(tmp_path, monkeypatch):
    # The same fault as a read-only directory, simulated so that it also holds when tests run as root.
    path = ckpt.save_checkpoint(tmp_path / "ckpt-00000003.pt", _state(3))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write .*Permission denied"):
        ckpt.save_checkpoint(tmp_path / "ckpt-00000004.pt", _state(4))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_check_run_dir_refuses_what_a_run_could_not_do(tmp_path):
    assert ckpt.check_run_dir(tmp_path / "new", resume=False) is None
    with pytest.raises(ValueError, match="nothing|no checkpoint to resume"):
        ckpt.check_run_dir(tmp_path / "new", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ckpt.check_run_dir(tmp_path / "file", resume=False)
    run = tmp_path / "run"
    run.mkdir()
    written = ckpt.save_checkpoint(ckpt.checkpoint_path(run, 3), {"format": ckpt.FORMAT, "version": ckpt.VERSION,
                                                                   "config": {}, "step": 3})
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ckpt.check_run_dir(run, resume=False)
    assert ckpt.check_run_dir(run, resume=True) == written
