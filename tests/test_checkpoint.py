import errno
import os
import pickle

import pytest
import torch

from deepcluster.checkpoint import (CheckpointError, atomic_write, check_compatible, load_checkpoint,
                                    rng_state, save_checkpoint, set_rng_state)


def test_round_trip_with_rng_state(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "rng": rng_state(), "meta": {"arch": "a", "k": 5}}
    save_checkpoint(state, tmp_path / "c.pt")
    a = torch.rand(3)
    loaded = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(loaded["rng"])
    torch.manual_seed(0)  # then restore again: the restored stream must equal the saved one
    set_rng_state(loaded["rng"])
    torch.testing.assert_close(torch.rand(3), a)
    assert loaded["epoch"] == 3 and loaded["package_version"]


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="disk full while writing"):
        atomic_write(path, full_disk)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
        atomic_write(tmp_path / "t.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o640


def test_figures_are_written_atomically(tmp_path):
    from deepcluster.viz import plot_nmi, save_figure

    path = tmp_path / "nmi.png"
    save_figure(plot_nmi([{"epoch": 1, "nmi_labels": 0.5}]), path)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG")

    fig = plot_nmi([{"epoch": 1, "nmi_labels": 0.6}])

    def broken(f, format):  # rendering fails half-way
        f.write(b"\x89PNG partial")
        raise RuntimeError("renderer failed")

    fig.savefig = broken
    with pytest.raises(RuntimeError):
        save_figure(fig, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["nmi.png"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/deepcluster-pwned",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = "/tmp/deepcluster-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "raw.pt")
    assert not os.path.exists(marker)


def test_incompatible_and_foreign_checkpoints(tmp_path):
    state = {"model": {}, "meta": {"arch": "alexnet_small", "k": 100}}
    with pytest.raises(CheckpointError, match="arch='alexnet_small'.*arch='vgg16'"):
        check_compatible(state, {"arch": "vgg16"})
    check_compatible(state, {"arch": "alexnet_small", "k": 100})
    save_checkpoint({"model": {}, "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a deepcluster checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
