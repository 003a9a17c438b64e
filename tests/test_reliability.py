"""The reliability matrix (docs/RELIABILITY.md): each row a test, most through the real
CLI in a subprocess, faults injected from outside (signals, a full file system, a file
size limit, broken files, a learning rate that really diverges, crafted checkpoints).

Subprocesses run single-threaded (``OMP_NUM_THREADS=1``): on 2 shared cores, two
OpenMP threads per process mostly spin. Runs are tiny (240 images, alexnet_small at
width 0.125, fc 128) and deterministic, so a resumed run can be compared bit for bit
with an uninterrupted one. Figures for the docs are printed with ``-s``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx
from deepcluster import __version__
from deepcluster.checkpoint import load_checkpoint, save_checkpoint
from deepcluster.config import resolve
from deepcluster.data import FolderSource
from deepcluster.diagnostics import collapse_warning

pytestmark = pytest.mark.reliability

SRC = Path(__file__).resolve().parents[1] / "src" / "deepcluster"
EPOCHS = 4  # of the runs compared with the uninterrupted reference
TINY = ["--k", "10", "--pca-dim", "32", "--batch-size", "64", "--workers", "0", "--deterministic",
        "--width", "0.125", "--fc-dim", "128", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING_KEYS = {"extract_s", "pca_s", "kmeans_s", "train_s", "epoch_s", "images_per_s"}
# The real CLI (deepcluster.cli.main), with a Python-level SIGUSR1 handler: the test asks
# the child where it is (its stack, written between two bytecodes; the process goes on)
# before it kills it. Not faulthandler.register: its dump reads the interpreter's frames
# from inside the signal handler, which Python documents as unsafe, and under thousands
# of polls a child crashed with SIGSEGV (2 of 5 runs of this file). faulthandler.enable
# stays on for real crashes: their stacks go to the child's stderr, shown by the asserts.
# The stack goes out in one os.write on an O_APPEND descriptor: a buffered file object
# refuses a write from a handler that interrupted another of its writes ("reentrant call
# inside BufferedWriter", seen once under heavy load), a single system call cannot be
# interrupted by a Python-level handler half-way.
BOOT = ("import faulthandler, os, signal, sys, traceback; faulthandler.enable(); "
        "_fd = os.open(os.environ['DC_STACKS'], os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
        "_dump = lambda sig, frame: os.write(_fd, (''.join(traceback.format_stack(frame)) + 'END OF STACK\\n').encode()); "
        "signal.signal(signal.SIGUSR1, _dump); os.write(_fd, b'ready\\n'); "
        "from deepcluster.cli import main; sys.exit(main())")
FIGURES: dict[str, int] = {"sigkill": 0, "bad_files": 0}
"""Counted as the tests run; printed in the session summary (conftest.py), quoted in docs/RELIABILITY.md."""


# --------------------------------------------------------------------------- helpers

def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepcluster", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one ``deepcluster: error:`` line of a failed CLI call."""
    lines = [line for line in p.stderr.splitlines() if line.startswith("deepcluster: error: ")]
    assert p.returncode not in (0, None) and len(lines) == 1, p.stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".*.tmp"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical weights, identical assignments and metrics (timings aside)."""
    a, b = load_checkpoint(run), load_checkpoint(ref)
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["assignments"], b["assignments"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(records(run)) == strip(records(ref))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


PHASES = [  # (function on the stack, phase), first match wins
    ("save_checkpoint", "checkpoint"), ("atomic_write", "write"), ("_save_epoch", "save"),
    ("train_one_epoch", "train"), ("cluster_shards", "kmeans"), ("extract_reduced", "extract"),
    ("run_epoch", "epoch"), ("_train", "setup"),
]


class Child:
    """``deepcluster train ...`` in a subprocess that can be asked which phase it is in."""

    def __init__(self, args: list[str], tmp: Path, name: str) -> None:
        self.stacks = tmp / f"{name}.stacks"
        self.stacks.write_text("")
        self.stderr_path = tmp / f"{name}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", BOOT, *args], stdout=subprocess.DEVNULL,
                                         stderr=err, env={**ENV, "DC_STACKS": str(self.stacks)})
        while "ready" not in self.stacks.read_text():  # SIGUSR1 before the handler would kill it
            assert self.proc.poll() is None, self.stderr
            time.sleep(0.005)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def phase(self) -> str | None:
        """Where the child is now (None once it has exited)."""
        start = self.stacks.stat().st_size
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(self.stacks) as f:
                f.seek(start)
                dump = f.read()
            if "END OF STACK\n" in dump:
                funcs = set(re.findall(r", in (\w+)$", dump, re.M))
                return next((ph for fn, ph in PHASES if fn in funcs), "startup")
            if self.proc.poll() is not None:
                return None
            time.sleep(0.0005)
        raise AssertionError("no stack dump from the child")

    def wait_for(self, wanted: set[str], timeout: float = 120) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ph = self.phase()
            if ph is None or ph in wanted:
                return ph
            time.sleep(0.05 if ph == "startup" else 0.002)
        raise AssertionError(f"child never reached {wanted}")

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


def epochs_logged(run: Path) -> int:
    """Epochs whose summary line is in train.log (all processes of the run)."""
    log = run / "train.log"
    found = re.findall(r"INFO deepcluster\.train: epoch (\d+): ", log.read_text()) if log.exists() else []
    return max(map(int, found), default=-1) + 1


def start_args(run: Path, root: Path, epochs: int = EPOCHS) -> list[str]:
    """A fresh run, or ``--resume`` (the run's own config.yaml) once it has been started."""
    if (run / "config.yaml").exists():
        return ["train", "--output-dir", str(run), "--resume"]
    return ["train", "--data-root", str(root), "--output-dir", str(run), "--epochs", str(epochs), *TINY]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tiny_mnist_root, tmp_path_factory) -> Path:
    """An uninterrupted deterministic run of EPOCHS epochs."""
    run = tmp_path_factory.mktemp("reference") / "run"
    p = cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(run), "--epochs", str(EPOCHS), *TINY)
    assert p.returncode == 0, p.stderr
    return run


@pytest.fixture(scope="module")
def one_epoch(tiny_mnist_root, tmp_path_factory) -> Path:
    """A finished 1-epoch run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("one-epoch") / "run"
    p = cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(run), "--epochs", "1", *TINY)
    assert p.returncode == 0, p.stderr
    return run


# --------------------------------------------------------------------------- SIGKILL

def test_sigkill_at_random_points_then_resume_is_bit_exact(tiny_mnist_root, reference, tmp_path):
    """14 SIGKILLs at random points of training, extraction, k-means, checkpoint writing
    and set-up; after each, the checkpoint on disk is complete (loads, epoch never goes
    back); ``--resume`` finishes a run identical to the uninterrupted one."""
    rng = np.random.default_rng(20181)
    # How long to sleep once inside a phase: at most half of its shortest duration in the
    # reference run, so the kill lands inside it on a fast machine as on a slow one.
    refs = records(reference)
    inside = {ph: 0.5 * min(r[f"{ph}_s"] for r in refs) for ph in ("train", "extract")}
    plan = ["train"] * 3 + ["extract"] * 3 + ["kmeans"] * 3 + ["checkpoint"] * 3 + ["setup"] * 2
    targets = rng.permutation(plan)
    target_epochs = np.sort(rng.integers(0, EPOCHS, len(plan)))
    run = tmp_path / "run"
    landed: list[tuple[str, str, int]] = []
    committed = 0
    for i, (target, epoch) in enumerate(zip(targets, target_epochs)):
        child = Child(start_args(run, tiny_mnist_root), tmp_path, f"kill{i}")
        if target == "checkpoint":
            # The write lasts milliseconds: once in the epoch, watch for its temp file and kill on sight.
            while child.proc.poll() is None and epochs_logged(run) < epoch:
                time.sleep(0.005)
            while child.proc.poll() is None and not any(run.glob(".checkpoint.pt.*.tmp")):
                time.sleep(0.0002)
            time.sleep(rng.uniform(0, 0.002))
        else:
            while True:
                ph = child.phase()
                if ph is None or (ph == target and epochs_logged(run) >= min(epoch, EPOCHS - 1)) or (
                        target == "setup" and ph not in ("startup", "setup")):
                    break
                time.sleep(0.05 if ph == "startup" else 0.001)  # imports take seconds
            if target in ("train", "extract") and ph == target:  # somewhere inside the phase
                time.sleep(rng.uniform(0, inside[target]))
        ph = "checkpoint" if target == "checkpoint" else child.phase()
        child.proc.send_signal(signal.SIGKILL)
        rc = child.finish()
        if rc == 0:  # the run finished before the kill point came
            break
        assert rc == -signal.SIGKILL, child.stderr
        if target == "checkpoint" and not any(run.glob(".checkpoint.pt.*.tmp")):
            ph = "after-write"
        landed.append((str(target), ph or "exited", epochs_logged(run)))
        if (run / "checkpoint.pt").exists():  # never half-written: it loads, and no epoch is lost
            state = load_checkpoint(run)
            assert state["epoch"] >= committed
            committed = state["epoch"]
    child = Child(start_args(run, tiny_mnist_root), tmp_path, "final")
    assert child.finish() == 0, child.stderr
    print("\nSIGKILL points (target, landed in, epochs done):", landed)
    phases = [ph for _, ph, _ in landed]
    assert len(landed) >= 12
    for ph in ("train", "extract", "kmeans", "checkpoint"):
        assert phases.count(ph) >= 1, (ph, landed)
    FIGURES["sigkill"] += len(landed)
    assert_same_run(run, reference)
    assert temps(run) == [] and not (run / "run.lock").exists()  # the half-written ones were cleaned up
    assert "temporary files of interrupted writes: .checkpoint.pt." in (run / "train.log").read_text()
    assert len(records(run)) == EPOCHS


# --------------------------------------------------------------------------- SIGINT / SIGTERM

@pytest.mark.parametrize("sig, code, fresh", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["SIGINT-during-epoch-0", "SIGTERM-after-a-checkpoint"])
def test_sigint_sigterm_keep_the_last_checkpoint_and_say_how_to_resume(sig, code, fresh, tiny_mnist_root, one_epoch,
                                                                      reference, tmp_path):
    run = tmp_path / "run"
    if not fresh:
        copy_run(one_epoch, run)
    before = digest(run / "checkpoint.pt") if not fresh else None
    args = start_args(run, tiny_mnist_root)
    if not fresh:
        args += ["--epochs", str(EPOCHS)]
    child = Child(args, tmp_path, "sig")
    assert child.wait_for({"train"}) == "train", child.stderr
    child.proc.send_signal(sig)
    assert child.finish() == code, child.stderr
    lines = [line for line in child.stderr.splitlines() if line.startswith("deepcluster: ")]
    kept = "no epoch had completed" if fresh else "checkpoint.pt keeps the last complete epoch"
    assert len(lines) == 1 and f"interrupted by {sig.name}; {kept}" in lines[0], child.stderr
    assert "Traceback" not in child.stderr
    command = re.search(r"`(deepcluster train .*)`", lines[0]).group(1)
    assert command == f"deepcluster train --output-dir {run} --resume"
    assert temps(run) == [] and not (run / "run.lock").exists()
    if fresh:
        assert not (run / "checkpoint.pt").exists()
    else:
        assert digest(run / "checkpoint.pt") == before
    assert f"interrupted by {sig.name}" in (run / "train.log").read_text()
    p = cli(*command.split()[1:])  # the printed command, as a user would type it
    assert p.returncode == 0, p.stderr
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- disk full

def _tmpfs_available(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_disk_full_on_a_tiny_tmpfs_keeps_the_previous_checkpoint(one_epoch, tmp_path):
    """A real ENOSPC: the run directory on a tmpfs with room for half a checkpoint."""
    if shutil.which("unshare") is None or not _tmpfs_available(tmp_path):
        pytest.skip("no user+mount namespace for a tmpfs here; the RLIMIT_FSIZE test covers the same path")
    mount, out = tmp_path / "mnt", tmp_path / "after"
    mount.mkdir()
    out.mkdir()
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in one_epoch.iterdir())
    room = (one_epoch / "checkpoint.pt").stat().st_size // 2
    script = (f"mount -t tmpfs -o size={(used + room) // 1024}k tmpfs {mount} && cp -a {one_epoch}/. {mount}/ && "
              f"{sys.executable} -m deepcluster train --output-dir {mount} --resume --epochs 2 2>{tmp_path}/err; "
              f"echo $? > {tmp_path}/rc; df -k {mount} > {tmp_path}/df; cp -a {mount}/. {out}/")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, timeout=300, check=True)
    p = subprocess.CompletedProcess([], int((tmp_path / "rc").read_text()), "", (tmp_path / "err").read_text())
    line = error_line(p)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"disk full while writing {mount}/checkpoint.pt (No space left on device); the previous file is intact" in line
    assert digest(out / "checkpoint.pt") == digest(one_epoch / "checkpoint.pt")
    assert temps(out) == [] and load_checkpoint(out)["epoch"] == 1


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: a write past ``limit`` fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("victim", ["checkpoint.pt", "metrics.jsonl"])
def test_file_size_limit_while_writing_keeps_every_file_intact(victim, one_epoch, tmp_path):
    """A size-limited file system (RLIMIT_FSIZE): the checkpoint, or the metrics report,
    cannot be written; one clear error, the previous files intact, then a clean resume."""
    run = copy_run(one_epoch, tmp_path / "run")
    before = {p.name: digest(p) for p in run.iterdir() if p.name != "train.log"}
    limit = (run / "checkpoint.pt").stat().st_size // 2 if victim == "checkpoint.pt" else 64
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2", preexec_fn=_limit_file_size(limit))
    line = error_line(p)
    assert p.returncode == 1
    assert f"file size limit reached while writing {run}/{victim} (File too large); the previous file is intact" in line
    assert digest(run / "checkpoint.pt") == before["checkpoint.pt"] and temps(run) == []
    if victim == "metrics.jsonl":  # failed before the epoch: nothing changed at all
        assert f"deepcluster: warning: cannot write {run}/train.log" in p.stderr and "Traceback" not in p.stderr
        assert {p.name: digest(p) for p in run.iterdir() if p.name != "train.log"} == before
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    assert [r["epoch"] for r in records(run)] == [0, 1] and load_checkpoint(run)["epoch"] == 2


def test_report_on_a_full_disk_is_one_line_and_the_checkpoint_is_intact(one_epoch, tmp_path):
    before = digest(one_epoch / "checkpoint.pt")
    p = cli("report", str(one_epoch), "--out", str(tmp_path / "report"), "--sample", "20", "--num-filters", "2",
            "--synth-steps", "0", "--queries", "1", "--clusters", "1", "1", "1", preexec_fn=_limit_file_size(4096))
    assert p.returncode == 1 and "File too large" in error_line(p) and "Traceback" not in p.stderr
    assert digest(one_epoch / "checkpoint.pt") == before


# --------------------------------------------------------------------------- bad images

def _bad_folder(root: Path, n_good: int) -> tuple[set[str], set[str]]:
    """``n_good`` plain PNGs, odd-but-valid images, broken files and non-image files.

    Returns the names that must be skipped and the odd ones that must be read.
    """
    rng = np.random.default_rng(5)
    root.mkdir()
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i:04d}.png")
    rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    png, jpg = root / "img0000.png", root / "_ref.jpg"
    Image.fromarray(rgb).save(jpg)
    # Odd but valid: read, following the policy of deepcluster.data.sources.to_rgb.
    Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)).save(root / "grey16.png")
    Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    pal = np.zeros((32, 32), np.uint8)
    pal[:, 16:] = 1
    pal_img = Image.fromarray(pal, "P")
    pal_img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal_img.save(root / "palette_alpha.png", transparency=1)
    shutil.copy(png, root / "png_named.jpg")
    Image.fromarray(rgb).save(root / "gif_named.png", format="GIF")
    shutil.copy(png, root / "UPPER.PNG")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 2), dtype=np.uint8), "LA").save(root / "grey_alpha.png")
    odd = {"grey16.png", "cmyk.jpg", "palette_alpha.png", "png_named.jpg", "gif_named.png", "UPPER.PNG", "rgba.png",
           "grey_alpha.png"}
    # Broken: skipped, counted, listed.
    (root / "truncated.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (root / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "page.png").write_text("<html><body>404</body></html>\n")
    Image.new("1", (12000, 12000)).save(root / "bomb.png")  # 144 M pixels in 18 kB
    broken = {"truncated.png", "truncated.jpg", "zero.png", "text.jpg", "page.png", "bomb.png"}
    # Not images by extension: ignored.
    shutil.move(jpg, root / "photo.dat")
    (root / "README.txt").write_text("crawl notes\n")
    return broken, odd


def test_bad_images_are_skipped_listed_and_training_proceeds(tmp_path):
    folder = tmp_path / "crawl"
    broken, odd = _bad_folder(folder, n_good=590)  # 6 broken of 604 images: 1 %
    run = tmp_path / "run"
    p = cli("train", "--data", "folder", "--data-root", str(folder), "--image-size", "32", "--output-dir", str(run),
            "--epochs", "1", *TINY)
    assert p.returncode == 0, p.stderr
    listed = dict(line.split("\t") for line in (run / "skipped_images.txt").read_text().splitlines())
    assert {Path(k).name for k in listed} == broken and all(listed.values())
    assert "DecompressionBomb" in listed[str(folder / "bomb.png")]
    assert f"skipped {len(broken)} unreadable images" in (run / "train.log").read_text()
    assert load_checkpoint(run)["meta"]["num_images"] == 590 + len(odd)
    FIGURES["bad_files"] += len(broken) + len(odd) + 2
    # The odd ones follow the documented policy.
    src = FolderSource(str(folder))
    assert src.ignored == 2 and len(src) == 590 + len(odd)
    load = {Path(p).name: np.asarray(src.load(i)) for i, p in enumerate(src.paths) if Path(p).name in odd}
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in load.values())
    g = load["grey16.png"][..., 0].astype(int)  # scaled, not clipped to white
    assert g.min() == 0 and g.max() == 255 and 100 < g.mean() < 155
    assert (load["palette_alpha.png"][:, 20] == 255).all() and (load["palette_alpha.png"][:, 2] == (255, 0, 0)).all()
    assert np.abs(load["cmyk.jpg"].astype(int) - (200, 30, 30)).max() <= 3


def test_a_folder_where_most_images_fail_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    for i in range(3):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(10))
    p = cli("train", "--data", "folder", "--data-root", str(folder), "--image-size", "32", "--k", "2",
            "--output-dir", str(tmp_path / "run"))
    assert "3 of 5 images under" in error_line(p) and "(more than 50%)" in error_line(p)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    FIGURES["bad_files"] += 3


# --------------------------------------------------------------------------- divergence

def test_a_diverging_loss_stops_naming_epoch_and_step_and_resumes_with_a_lower_lr(one_epoch, tmp_path):
    """A learning rate that really diverges (no injection): NaN loss in epoch 1."""
    run = copy_run(one_epoch, tmp_path / "run")
    before = digest(run / "checkpoint.pt")
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2", "--lr", "1e12")
    line = error_line(p)
    assert re.search(r"loss became (nan|inf|-inf) at epoch 1 step \d+; the last good checkpoint is kept; "
                     r"resume with --resume and a lower --lr", line), line
    assert digest(run / "checkpoint.pt") == before and temps(run) == []
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2", "--lr", "0.01")
    assert p.returncode == 0, p.stderr
    state = load_checkpoint(run)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["epoch"] for r in records(run)] == [0, 1]


def test_weights_that_diverge_in_the_last_step_are_never_checkpointed():
    """The loss check sees a divergence one step late: the epoch's end checks the state."""
    from deepcluster.models import create_model
    from deepcluster.optim import NonFiniteLossError, train_one_epoch

    torch.manual_seed(0)
    model = create_model("alexnet_small", num_clusters=3, image_size=28, width=0.125, fc_dim=16)
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    # lr x weight decay x w overflows float32 for any w != 0: the one step's loss is finite,
    # the weights after it are not.
    opt = torch.optim.SGD(body, lr=1e38, weight_decay=1e38)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=1e-3)
    batch = [(torch.randn(8, 3, 28, 28), torch.arange(8))]
    with pytest.raises(NonFiniteLossError, match="by the end of epoch 7"):
        train_one_epoch(model, batch, torch.arange(8) % 3, opt, head_opt, torch.device("cpu"), 7)


# --------------------------------------------------------------------------- collapse

def test_collapse_is_warned_in_the_log_and_the_metrics(tmp_path):
    """40/10/10 copies of three images, k=3: one cluster holds 67 %, and from epoch 3
    the assignments have not changed for 3 epochs."""
    folder = tmp_path / "dups"
    folder.mkdir()
    rng = np.random.default_rng(1)
    bases = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    for i in range(60):
        Image.fromarray(bases[0 if i < 40 else 1 + i % 2]).save(folder / f"{i:02d}.png")
    run = tmp_path / "run"
    p = cli("train", "--data", "folder", "--data-root", str(folder), "--image-size", "32", "--output-dir", str(run),
            "--epochs", "4", "--k", "3", "--pca-dim", "8", "--batch-size", "32", "--workers", "0",
            "--width", "0.125", "--fc-dim", "128", "--deterministic")
    assert p.returncode == 0, p.stderr
    warnings = [r["collapse_warning"] for r in records(run)]
    assert all(w and "one cluster holds 67% of the images" in w and "Likely causes" in w for w in warnings), warnings
    assert ["not changed for 3 epochs" in w for w in warnings] == [False, False, False, True]
    log = (run / "train.log").read_text()
    assert log.count("WARNING deepcluster.train: epoch ") == 4 and "learning rate too high" in log


def test_a_healthy_run_has_no_collapse_warning(reference):
    assert [r["collapse_warning"] for r in records(reference)] == [None] * EPOCHS


def test_collapse_thresholds():
    cfg = resolve(overrides={"model": {"sobel": False}, "cluster": {"k": 4}})
    assert collapse_warning(np.array([50, 30, 20]), [0.5], cfg) is None  # exactly half is not more than half
    w = collapse_warning(np.array([51, 29, 20]), [], cfg)
    assert "51%" in w and "--no-sobel" in w and "k=4" in w
    assert collapse_warning(np.array([10] * 4), [0.9995, 0.9995, 0.998], cfg) is None
    w = collapse_warning(np.array([10] * 4), [0.2, 0.9995, 1.0, 0.999], cfg)
    assert "not changed for 3 epochs" in w and "one cluster" not in w


# --------------------------------------------------------------------------- checkpoints

class Payload:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_crafted_to_run_code_is_refused_and_never_runs(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = load_checkpoint(run)
    state["rng"] = Payload(marker)
    torch.save(state, run / "checkpoint.pt")
    p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2")
    assert "cannot load checkpoint" in error_line(p) and "weights_only=True" in error_line(p)
    assert not marker.exists()
    torch.load(run / "checkpoint.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_every_load_in_the_package_is_safe():
    """No code path unpickles: torch.load always with weights_only=True; no pickle,
    no np.load(allow_pickle=True), no yaml.load / unsafe_load."""
    torch_loads = 0
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(SRC)}:{node.lineno}: {name}"
            if name == "torch.load":
                torch_loads += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            assert not re.fullmatch(r"(c?pickle|dill|joblib)\.loads?|yaml\.(load|unsafe_load)|torch\.jit\.load", name), where
            if name.endswith("np.load") or name == "numpy.load":
                assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), where
    assert torch_loads >= 1


def _edit_checkpoint(src: Path, dst: Path, **changes) -> Path:
    run = copy_run(src, dst)
    state = load_checkpoint(run)
    state.update(changes)
    save_checkpoint(state, run / "checkpoint.pt")
    return run


def test_a_checkpoint_of_another_architecture_k_or_version_is_refused_in_one_line(one_epoch, tmp_path):
    before = digest(one_epoch / "checkpoint.pt")
    cases = [
        (one_epoch, ["--k", "12"], "was written with k=10, this run has k=12"),
        (one_epoch, ["--arch", "vgg16"], "was written with arch='alexnet_small', this run has arch='vgg16'"),
        (_edit_checkpoint(one_epoch, tmp_path / "minor", package_version="0.99.0"), [],
         f"was written by deepcluster 0.99.0, this is {__version__}"),
        (_edit_checkpoint(one_epoch, tmp_path / "format", format_version=2), [],
         f"has checkpoint format 2 (package {__version__}), this package reads format 1"),
    ]
    for run, extra, needle in cases:
        p = cli("train", "--output-dir", str(run), "--resume", "--epochs", "2", *extra)
        assert needle in error_line(p), (needle, p.stderr)
        assert "Traceback" not in p.stderr
    assert digest(one_epoch / "checkpoint.pt") == before


def test_another_patch_release_resumes_with_a_warning(caplog):
    from deepcluster.checkpoint import CheckpointError, check_compatible

    major, minor, *_ = __version__.split(".")
    check_compatible({"meta": {}, "package_version": f"{major}.{minor}.999"}, {}, "c.pt")
    assert "resuming a run written by deepcluster" in caplog.text
    with pytest.raises(CheckpointError, match=f"deepcluster {major}.{int(minor) + 1}.0"):
        check_compatible({"meta": {}, "package_version": f"{major}.{int(minor) + 1}.0"}, {}, "c.pt")
    check_compatible({"meta": {}, "package_version": "9.9.9"}, {}, "c.pt", same_release=False)  # eval, export


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr: 0.1\n  learning_rate: 0.1\n", "unknown config key optim.learning_rate"),
    ("cluster:\n  k: ten\n", "cluster.k: expected int, got str 'ten'"),
    ("optim:\n  lr: .nan\n", "optim.lr: expected a finite number"),
])
def test_a_bad_config_is_one_line_naming_the_key(text, needle, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    p = cli("train", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "run"), timeout=120)
    assert p.returncode == 2 and needle in error_line(p) and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert resolve(file=tmp_path / "c.yaml").optim.lr == 1e-3


# --------------------------------------------------------------------------- one run directory, one run

def test_a_second_run_on_the_same_directory_is_refused(tiny_mnist_root, reference, tmp_path):
    run = tmp_path / "run"
    first = Child(start_args(run, tiny_mnist_root), tmp_path, "first")
    assert first.wait_for({"extract"}) == "extract", first.stderr  # holds run.lock, no checkpoint yet
    first.proc.send_signal(signal.SIGSTOP)  # alive, holding the lock, while the others try
    try:
        fresh = cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(run), *TINY)
        resumed = cli("train", "--output-dir", str(run), "--resume")
    finally:
        first.proc.send_signal(signal.SIGCONT)
    for p in (fresh, resumed):
        assert f"{run} is in use by process {first.proc.pid} (run.lock)" in error_line(p)
    first.wait_for({"train"})
    first.proc.send_signal(signal.SIGKILL)  # its lock dies with it
    first.finish()
    FIGURES["sigkill"] += 1
    p = cli("train", "--output-dir", str(run), "--resume")
    assert p.returncode == 0, p.stderr
    p = cli("train", "--data-root", str(tiny_mnist_root), "--output-dir", str(run), *TINY)
    assert "already holds a run; pass --resume" in error_line(p)
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- soak

def test_soak_30_epochs_on_2000_images_killed_every_3_epochs(tmp_path):
    """30 epochs, a SIGKILL at a random moment of every third epoch: one metrics line
    per epoch, a complete assignment history, nothing left behind."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(30)
    labels = np.arange(2500) % 10
    imgs = rng.integers(0, 60, (2500, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        imgs[i, 2 + (c // 5) * 12: 12 + (c // 5) * 12, 2 + (c % 5) * 5: 7 + (c % 5) * 5] = 200
    for prefix, n in (("train", 2500), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs[:n])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[:n].astype(np.uint8))
    run = tmp_path / "run"
    args = ["train", "--data-root", str(root), "--subset", "2000", "--output-dir", str(run), "--epochs", "30",
            "--k", "10", "--pca-dim", "16", "--batch-size", "256", "--workers", "0", "--width", "0.125",
            "--fc-dim", "128", "--deterministic"]
    kills, starts = 0, 0
    t0 = time.monotonic()
    while True:
        starts += 1
        cmd = ["train", "--output-dir", str(run), "--resume"] if (run / "config.yaml").exists() else args
        with open(tmp_path / f"soak{starts}.stderr", "w") as err:
            child = subprocess.Popen([sys.executable, "-m", "deepcluster", *cmd], stdout=subprocess.DEVNULL,
                                     stderr=err, env=ENV)
        target = 3 * (kills + 1)
        while child.poll() is None and epochs_logged(run) < target:
            time.sleep(0.02)
        if child.poll() is not None or target >= 30:
            break
        epoch_s = records(run)[-1]["epoch_s"]
        time.sleep(rng.uniform(0, epoch_s))  # somewhere in the next epoch
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        kills += 1
    assert child.wait(timeout=600) == 0, (tmp_path / f"soak{starts}.stderr").read_text()
    print(f"\nsoak: {kills} SIGKILLs, {starts} starts, {time.monotonic() - t0:.0f}s")
    FIGURES["sigkill"] += kills
    assert kills == 9
    assert [r["epoch"] for r in records(run)] == list(range(30))
    history = np.load(run / "assignments.npy")
    state = load_checkpoint(run)
    assert history.shape == (30, 2000) and state["epoch"] == 30
    np.testing.assert_array_equal(history[-1:], state["assignments"].numpy())
    assert history.min() >= 0 and history.max() < 10 and all(len(np.unique(h)) == 10 for h in history)
    assert (run / "train.log").read_text().count("INFO deepcluster.train: DeepCluster ") == starts
    assert temps(run) == [] and not (run / "run.lock").exists()
