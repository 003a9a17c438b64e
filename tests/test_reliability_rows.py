"""Reliability, second round (issue 22): a run knows which file each row is, refuses
what it cannot trust before touching anything, and names the file in every error.

Each test makes the hostile situation for real (renamed files, a tampered checkpoint, a
damaged metrics file, a size-limited file system, a SIGINT in start-up) and checks the
one-line error and that every earlier output is byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_reliability import _limit_file_size, cli, digest, error_line

pytestmark = pytest.mark.reliability


def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run folder (not sub-folders) -> its SHA-256."""
    return {p.name: digest(p) for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    return make_run(tmp_path_factory.mktemp("rows"))


def make_run(base: Path) -> tuple[Path, Path]:
    """24 distinct PNGs and a 1-epoch run on them (k = 3)."""
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(images / f"img{i:02d}.png")
    run = base / "run"
    p = cli("train", "--data", "folder", "--data-root", str(images), "--output-dir", str(run), "--epochs", "1",
            "--k", "3", "--pca-dim", "4", "--batch-size", "8", "--workers", "0")
    assert p.returncode == 0, p.stderr
    return images, run


def copy_case(folder_run, tmp_path) -> tuple[Path, Path]:
    import shutil

    images, run = folder_run
    shutil.copytree(images, tmp_path / "images")
    shutil.copytree(run, tmp_path / "run")
    cfg = (tmp_path / "run" / "config.yaml")
    cfg.write_text(cfg.read_text().replace(str(images), str(tmp_path / "images")))
    return tmp_path / "images", tmp_path / "run"


def test_the_run_records_which_file_each_row_is(folder_run):
    from deepcluster.data import Manifest

    images, run = folder_run
    m = Manifest.load(run / "manifest.npz")
    assert m.paths == sorted(p.name for p in images.iterdir())
    assert m.sizes.tolist() == [(images / p).stat().st_size for p in m.paths]


def test_renamed_files_same_count_refuse_resume_export_and_report(tmp_path):
    images, run = make_run(tmp_path)  # its own folder: the checkpoint names it
    for i in range(3):  # same count, three rows now other files
        os.rename(images / f"img{i:02d}.png", images / f"zz{i:02d}.png")
    before = snapshot(run)
    for args in (["train", "--output-dir", str(run), "--resume", "--epochs", "2"],
                 ["export", str(run), "-o", str(tmp_path / "out.csv")],
                 ["report", str(run), "--out", str(tmp_path / "report")]):
        line = error_line(cli(*args))
        assert "3 renamed since the run started" in line and "no longer name the same files" in line, line
    assert snapshot(run) == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "report").exists()


def test_an_out_of_range_checkpoint_is_refused_before_anything_changes(folder_run, tmp_path):
    _, run = copy_case(folder_run, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["epoch"] = -5
    torch.save(state, run / "checkpoint.pt")
    before = snapshot(run)
    line = error_line(cli("train", "--output-dir", str(run), "--resume", "--epochs", "2"))
    assert "epoch must be a positive number of completed epochs, got -5" in line and "nothing was changed" in line
    assert snapshot(run) == before  # metrics.jsonl not wiped, no train.log line


def test_a_damaged_metrics_file_is_named_with_its_line_and_nothing_is_written(folder_run, tmp_path):
    _, run = copy_case(folder_run, tmp_path)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "convnet_loss": "unterminated\n')
    before = snapshot(run)
    line = error_line(cli("train", "--output-dir", str(run), "--resume", "--epochs", "2"))
    assert f"{run / 'metrics.jsonl'} line 1 is not valid JSON" in line
    assert snapshot(run) == before


def test_an_unrelated_folder_is_not_taken_over(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("my own numbers, not JSON\n")
    line = error_line(cli("train", "--output-dir", str(foreign), "--epochs", "1", "--subset", "64"))
    assert "holds metrics.jsonl but no config.yaml or checkpoint.pt" in line
    assert sorted(p.name for p in foreign.iterdir()) == ["metrics.jsonl"]  # no train.log, no lock


@pytest.mark.parametrize("fmt", ["csv", "npy"])
def test_a_full_disk_during_export_names_the_file_and_leaves_nothing(folder_run, tmp_path, fmt):
    _, run = copy_case(folder_run, tmp_path)
    out = tmp_path / f"clusters.{fmt}"
    out.write_bytes(b"previous export")
    line = error_line(cli("export", str(run), "--format", fmt, "-o", str(out), "--features", "fc7",
                          preexec_fn=_limit_file_size(256)))
    assert f"while writing {out}" in line and "the previous file is intact" in line
    assert out.read_bytes() == b"previous export" and not list(tmp_path.glob(".*.tmp"))


def test_sigint_in_start_up_does_not_promise_a_resume(tmp_path, monkeypatch, capsys):
    import deepcluster.train as train_mod
    from deepcluster.cli import main

    def interrupted(cfg, callbacks=None):
        raise KeyboardInterrupt  # what SIGINT raises while the data set is being read

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", "--output-dir", str(tmp_path / "new")]) == 130
    err = capsys.readouterr().err
    assert "before anything was saved" in err and "--resume" not in err


def test_resume_without_config_yaml_takes_the_checkpoint_s_settings(folder_run, tmp_path):
    _, run = copy_case(folder_run, tmp_path)
    (run / "config.yaml").unlink()
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    from deepcluster.checkpoint import load_checkpoint

    state = load_checkpoint(run)
    assert state["epoch"] == 2 and state["meta"]["k"] == 3


def test_eval_on_a_read_only_run_folder_fails_before_any_work(folder_run, monkeypatch):
    """The check comes before the data are read (it took 164 s of work to fail before);
    a read-only file system is simulated: as root, permissions cannot make one here."""
    import errno

    import deepcluster.eval.context as context
    import deepcluster.rundir as rundir

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*a, **k):
        raise AssertionError("the evaluation data were read before the writability check")

    monkeypatch.setattr(rundir, "writable_dir", read_only)
    monkeypatch.setattr(context, "load_eval_data", never)
    _, run = folder_run
    with pytest.raises(rundir.RunDirError, match="is not writable .Read-only file system."):
        context.open_checkpoint(run)


def test_a_failed_viz_leaves_no_empty_folder(folder_run, tmp_path):
    _, run = folder_run
    out = tmp_path / "figs"
    line = error_line(cli("viz", "top-images", str(run), "--layer", "conv9", "--out", str(out)))
    assert "conv9" in line and not out.exists()


def _identity_png(path: Path, ident: int) -> None:
    """A PNG whose pixels encode ``ident`` (the row check reads it back)."""
    img = np.zeros((28, 28, 3), dtype=np.uint8)
    img[0, 0] = (ident % 256, ident // 256, 77)
    img[5:23, 5:23] = np.random.default_rng(ident).integers(0, 255, (18, 18, 3))
    Image.fromarray(img).save(path)


def _identity(path: str) -> int:
    with Image.open(path) as im:
        r, g, _ = im.convert("RGB").getpixel((0, 0))
    return r + 256 * g


MUTATIONS = ("none", "rename", "delete", "add", "rewrite", "dangling-link", "loop-link")


@pytest.mark.parametrize("seed", range(len(MUTATIONS)))
def test_generated_folders_and_changes_between_train_and_export(seed, tmp_path):
    """Seeded generated cases: a random folder tree (nested directories, a corrupt file),
    a 1-epoch run, a random change, then ``export``. Either every exported row names the
    file whose pixels carry that row's identity, or one error line and every earlier
    output byte-identical."""
    rng = np.random.default_rng(seed)
    images = tmp_path / "images"
    dirs = [images / f"d{j}" for j in range(int(rng.integers(1, 4)))]
    for d in dirs:
        d.mkdir(parents=True)
    n = int(rng.integers(16, 28))
    for i in range(n):
        _identity_png(dirs[int(rng.integers(len(dirs)))] / f"im{i:03d}.png", i)
    (dirs[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    run = tmp_path / "run"
    p = cli("train", "--data", "folder", "--data-root", str(images), "--output-dir", str(run), "--epochs", "1",
            "--k", "2", "--pca-dim", "4", "--batch-size", "8", "--workers", "0", "--labels", "none")
    assert p.returncode == 0, p.stderr
    files = sorted(images.rglob("im*.png"))
    mutation = MUTATIONS[seed]  # every kind once; the tree, the victim and the sizes from the seed
    victim = files[int(rng.integers(len(files)))]
    if mutation == "rename":
        victim.rename(victim.with_name("zz_" + victim.name))
    elif mutation == "delete":
        victim.unlink()
    elif mutation == "add":
        _identity_png(dirs[-1] / "new.png", 999)
    elif mutation == "rewrite":
        _identity_png(victim, 998)
    elif mutation == "dangling-link":
        os.symlink(tmp_path / "nothere.png", dirs[0] / "dangling.png")
    elif mutation == "loop-link":
        os.symlink(".", dirs[0] / "loop")
    before = snapshot(run)
    out = tmp_path / "out.csv"
    q = cli("export", str(run), "-o", str(out))
    if mutation in ("none", "dangling-link", "loop-link"):  # the rows still name the same files
        assert q.returncode == 0, (mutation, q.stderr)
        import csv

        rows = list(csv.DictReader(open(out, newline="")))
        assert len(rows) == n
        from deepcluster.data import Manifest

        trained = Manifest.load(run / "manifest.npz").paths  # which file each training row was
        assert [os.path.relpath(r["path"], images) for r in rows] == trained
        np.testing.assert_array_equal([int(r["cluster"]) for r in rows], np.load(run / "assignments.npy")[-1])
        for row in rows:  # and the file there now is the same picture
            assert _identity(row["path"]) == int(Path(row["path"]).stem[2:])
    else:
        line = error_line(q)
        assert "since the run started" in line, (mutation, line)
        assert not out.exists() and snapshot(run) == before
