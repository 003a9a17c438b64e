"""File-system hazards of a folder data set (issue 22, docs/RELIABILITY.md "File-system
hazards"): links that dangle or loop, directories reached twice, names that are not
UTF-8, FIFOs, files that change between two scans, and the manifest that says which file
each row is.

Trees are built for real in a temporary directory (bytes paths, so names can be any
bytes); nothing is mocked. Each PNG carries an identity in its pixels (red + 256 * green),
so a test can tell which file a row really is by decoding it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepcluster.data import FolderSource
from deepcluster.data.manifest import Manifest, ManifestError, diff, remap
from deepcluster.data.scan import display_path, list_images, parse_display_path, walk_images

BAD = b"bad\xff\xfename.png"  # legal on Linux, not UTF-8
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- helpers
def png(path: str | bytes, ident: int, size: tuple[int, int] = (6, 5)) -> None:
    """A PNG at ``path`` whose every pixel encodes ``ident`` (< 65536)."""
    with open(path, "wb") as f:
        Image.new("RGB", size, (ident % 256, ident // 256, 7)).save(f, format="PNG")


def write_bad_name(folder: Path, data: bytes) -> None:
    """``data`` in ``folder/bad\xff\xfename.png`` (a name that is not UTF-8)."""
    with open(os.path.join(os.fsencode(folder), BAD), "wb") as f:
        f.write(data)


def ident_of(img: Image.Image) -> int:
    r, g, _ = np.asarray(img.convert("RGB"))[0, 0]
    return int(r) + 256 * int(g)


def scan(root: str | bytes, **kw) -> FolderSource:
    return FolderSource(os.fsdecode(root), **kw)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCLUSTER_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- display_path
@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"/" not in b))
@settings(max_examples=500, deadline=None, derandomize=True)
def test_display_path_round_trips_any_byte_name_and_is_one_utf8_line(name):
    p = os.fsdecode(b"/data/" + name)
    shown = display_path(p)
    shown.encode("utf-8")  # never raises
    assert "\n" not in shown and "\t" not in shown and "\r" not in shown
    assert os.fsencode(parse_display_path(shown)) == b"/data/" + name


@given(st.text(st.characters(exclude_categories=()), max_size=30))  # lone surrogates included
@settings(max_examples=300, deadline=None, derandomize=True)
def test_display_path_round_trips_any_string(s):
    shown = display_path(s)
    shown.encode("utf-8")
    assert parse_display_path(shown) == s


def test_display_path_examples():
    assert display_path(os.fsdecode(b"dir/" + BAD)) == "dir/bad\\xff\\xfename.png"
    assert display_path("caf\u00e9/\u732b.png") == "caf\u00e9/\u732b.png"  # UTF-8 names stay readable
    assert display_path("a\tb\nc\\d.png") == "a\\x09b\\x0ac\\\\d.png"
    assert display_path("plain/name 1.png") == "plain/name 1.png"
    with pytest.raises(ValueError, match="backslash"):
        parse_display_path("a\\qb")


# --------------------------------------------------------------------------- the walker
def test_plain_tree_lists_exactly_what_sorted_os_walk_listed(tmp_path):
    """Rows of runs made before the walker must still be the same files."""
    for d in ("a", "a b", "a/x", "a-b", "B", "a/x/deep"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(("z.png", "a/1.png", "a b/2.PNG", "a/x/3.jpg", "a-b/4.png", "B/5.png",
                           "a/x/deep/6.png", "a/10.png", "a/9.png")):
        png(tmp_path / f, i)
    (tmp_path / "a" / "notes.txt").write_text("x")
    old = []
    for dirpath, _, names in sorted(os.walk(tmp_path, followlinks=True)):
        old += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith((".png", ".jpg"))]
    walk = walk_images(str(tmp_path))
    assert [f.path for f in walk.files] == old and walk.ignored == 1


def test_loops_are_not_entered_and_two_loops_terminate(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png", i)
    (tmp_path / "sub").mkdir()
    png(tmp_path / "sub" / "s.png", 9)
    os.symlink(".", tmp_path / "loop")
    os.symlink(".", tmp_path / "loop2")
    os.symlink("..", tmp_path / "sub" / "up")
    walk = walk_images(str(tmp_path))
    names = [os.path.relpath(f.path, tmp_path) for f in walk.files]
    assert names == ["0.png", "1.png", "2.png", "sub/s.png"]
    assert sorted(os.path.relpath(d, tmp_path) for d, _ in walk.not_entered) == ["loop", "loop2", "sub/up"]


def test_a_link_outside_is_followed_once_and_a_file_reached_twice_is_listed_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    png(outside / "o.png", 1)
    png(root / "m.png", 2)
    os.symlink(outside, root / "a_link")  # sorts before z_link: its path is the one kept
    os.symlink(outside, root / "z_link")
    os.symlink("m.png", root / "k_alias.png")  # before m.png: k_alias.png is kept, m.png dropped
    walk = walk_images(str(root))
    names = [os.path.relpath(f.path, root) for f in walk.files]
    assert names == ["k_alias.png", "a_link/o.png"]
    assert [os.path.relpath(p, root) for p, _ in walk.duplicates] == ["m.png"]
    assert [os.path.relpath(d, root) for d, _ in walk.not_entered] == ["z_link"]


def test_a_bind_mount_that_loops_back_is_not_entered(tmp_path):
    """A mount point is crossed; a bind mount of the folder inside itself (no link in
    sight: same st_dev and st_ino) is a loop all the same. Needs a user + mount namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user + mount namespace here")
    png(tmp_path / "a.png", 1)
    (tmp_path / "sub" / "mnt").mkdir(parents=True)
    png(tmp_path / "sub" / "b.png", 2)
    scan_py = Path(__file__).resolve().parents[1] / "src" / "deepcluster" / "data" / "scan.py"
    code = ("import importlib.util as u, json, sys; s = u.spec_from_file_location('scan', sys.argv[2]); "
            "m = sys.modules['scan'] = u.module_from_spec(s); s.loader.exec_module(m); w = m.walk_images(sys.argv[1]); "
            "print(json.dumps([[f.path for f in w.files], w.not_entered]))")  # scan.py alone: no torch import
    p = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1/sub/mnt" && exec "$2" -c "$3" "$1" "$4"',
                        "sh", str(tmp_path), sys.executable, code, str(scan_py)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    files, not_entered = json.loads(p.stdout)
    assert files == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png")]
    assert [d for d, _ in not_entered] == [str(tmp_path / "sub" / "mnt")]


def test_image_folder_loop_link_is_not_a_class(tmp_path):
    for c, n in (("cat", 2), ("dog", 3)):
        (tmp_path / c).mkdir()
        for i in range(n):
            png(tmp_path / c / f"{i}.png", 10 * len(c) + i)
    os.symlink(".", tmp_path / "loop")
    os.symlink("cat", tmp_path / "kitten")  # a second name for a class
    src = scan(tmp_path)
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 0, 1, 1, 1] and src.skipped == []


def test_list_images_agrees_with_the_folder_source(tmp_path):
    for i in range(3):
        png(tmp_path / f"{i}.png", i)
    os.symlink(".", tmp_path / "loop")
    os.symlink("nothere.png", tmp_path / "dangling.png")
    paths, problems = list_images(tmp_path)
    assert paths == scan(tmp_path).paths
    assert problems == [(str(tmp_path / "dangling.png"), "dangling symbolic link")]


def test_a_fifo_named_png_is_skipped_without_opening_it(tmp_path):
    png(tmp_path / "a.png", 1)
    os.mkfifo(tmp_path / "pipe.png")  # open() on it would block forever
    src = scan(tmp_path)
    assert src.skipped == [(str(tmp_path / "pipe.png"), "not a regular file (fifo)")] and len(src) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: permissions cannot be tested")
def test_an_unreadable_file_and_directory(tmp_path):
    png(tmp_path / "a.png", 1)
    png(tmp_path / "locked.png", 2)
    (tmp_path / "d").mkdir()
    png(tmp_path / "d" / "hidden.png", 3)
    os.chmod(tmp_path / "locked.png", 0)
    os.chmod(tmp_path / "d", 0)
    try:
        src = scan(tmp_path)
        assert src.skipped == [(str(tmp_path / "locked.png"), "unreadable: Permission denied")]
        assert src.paths == [str(tmp_path / "a.png")]
    finally:
        os.chmod(tmp_path / "d", 0o755)


# --------------------------------------------------------------------------- regressions (issue 22, 1-3)
@pytest.mark.reliability
def test_dangling_link_is_skipped_with_a_string_reason_and_written_by_the_trainer(tmp_path):
    """Defect 1: the memo's "unknown" (``False``) was the reason; the trainer then failed
    with ``'bool' object has no attribute 'replace'`` writing ``skipped_images.txt``."""
    from deepcluster.rundir import RunDir

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        png(folder / f"{i}.png", i)
    os.symlink("nothere.png", folder / "dangling.png")
    os.symlink("self.png", folder / "self.png")
    for _ in range(2):  # the second scan reads the memo
        src = scan(folder)
        assert src.skipped == [(str(folder / "dangling.png"), "dangling symbolic link"),
                               (str(folder / "self.png"), "symbolic link loop")]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_skipped(src.skipped)
    assert run.skipped.read_text().splitlines() == [f"{folder}/dangling.png\tdangling symbolic link",
                                                    f"{folder}/self.png\tsymbolic link loop"]


@pytest.mark.reliability
def test_a_symlink_loop_lists_each_image_once(tmp_path):
    """Defect 2: ``ln -s . loop`` listed every image 41 times; two loops hung."""
    for i in range(4):
        png(tmp_path / f"{i}.png", i)
    os.symlink(".", tmp_path / "loop")
    os.symlink(".", tmp_path / "loop2")
    src = scan(tmp_path)
    assert src.paths == [str(tmp_path / f"{i}.png") for i in range(4)] and src.skipped == []


@pytest.mark.reliability
def test_a_non_utf8_unreadable_file_is_skipped_and_written_without_an_encoding_error(tmp_path):
    """Defect 3: a name that is not UTF-8 cannot be written as UTF-8 text."""
    from deepcluster.rundir import RunDir

    folder = tmp_path / "imgs"
    folder.mkdir()
    png(folder / "ok.png", 1)
    png(os.path.join(os.fsencode(folder), b"good\xe9.png"), 2)
    write_bad_name(folder, b"not a png")
    src = scan(folder)
    assert [ident_of(src.load(i)) for i in range(len(src))] == [2, 1]  # "good\xe9" sorts before "ok"
    assert src.skipped == [(f"{folder}/bad\\xff\\xfename.png", "UnidentifiedImageError: cannot identify image file")]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_skipped(src.skipped)
    shown = run.skipped.read_bytes().decode("utf-8").split("\t")[0]
    assert os.fsencode(parse_display_path(shown)) == os.path.join(os.fsencode(folder), BAD)


@pytest.mark.reliability
def test_training_on_a_folder_with_every_hazard_completes(tmp_path):
    """The real CLI over dangling and looping links, a FIFO and a non-UTF-8 broken file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    for i, arr in enumerate(noise):
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
    os.symlink("nothere.png", folder / "dangling.png")
    os.symlink(".", folder / "loop")
    os.mkfifo(folder / "pipe.png")
    write_bad_name(folder, b"junk")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "deepcluster", "train", "--data", "folder", "--data-root", str(folder),
                        "--image-size", "16", "--output-dir", str(run), "--epochs", "1", "--k", "2", "--pca-dim", "8",
                        "--batch-size", "20", "--workers", "0", "--width", "0.125", "--fc-dim", "32"],
                       capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    listed = dict(line.split("\t") for line in (run / "skipped_images.txt").read_text("utf-8").splitlines())
    assert listed == {f"{folder}/bad\\xff\\xfename.png": "UnidentifiedImageError: cannot identify image file",
                      f"{folder}/dangling.png": "dangling symbolic link",
                      f"{folder}/pipe.png": "not a regular file (fifo)"}


# --------------------------------------------------------------------------- scan memo and manifest
def test_the_memo_is_compact_and_an_old_json_memo_is_discarded(tmp_path):
    from deepcluster.data.check import ScanMemo

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        png(folder / f"{i}.png", i)
    memo = ScanMemo(folder)
    old = memo.path.with_suffix(".json")
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"root": str(folder.resolve()), "entries": {"0.png": [1, 2, False]}}))
    src = scan(folder)
    assert not old.exists() and memo.path.exists() and len(src) == 3
    assert ScanMemo(folder).entries == {f"{i}.png": (s, t, None) for i, s, t in
                                                 zip(range(3), src.sizes.tolist(), src.mtimes_ns.tolist())}


def test_manifest_round_trips_non_utf8_names_and_refuses_a_broken_file(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    png(folder / "sub" / "a.png", 1)
    png(os.path.join(os.fsencode(folder), BAD), 2)
    m = Manifest.from_source(scan(folder))
    m.save(tmp_path / "m.npz")
    back = Manifest.load(tmp_path / "m.npz")
    assert [os.fsencode(p) for p in back.paths] == [BAD, b"sub/a.png"]
    for p, size, t, ino in zip(back.paths, back.sizes, back.mtimes_ns, back.inodes):
        s = os.stat(os.path.join(os.fsencode(folder), os.fsencode(p)))
        assert (size, t, ino) == (s.st_size, s.st_mtime_ns, s.st_ino)
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "m.npz").read_bytes()[:100])
    for bad in (tmp_path / "cut.npz", tmp_path / "missing.npz"):
        with pytest.raises(ManifestError, match=re.escape(str(bad))):
            Manifest.load(bad)


def test_diff_against_a_hand_built_reference():
    old = Manifest(["a", "b", "c", "d", "e", "f", "g"], [1, 2, 3, 4, 5, 6, 6], [10, 20, 30, 40, 50, 60, 60],
                   [1, 2, 3, 4, 5, 6, 7])
    # a unchanged; b changed (size); c renamed to c2; d removed; e unchanged, moved to row 0;
    # f and g: same size and time, both removed, and one added with f's inode -> f renamed to f2;
    # h added; x added with d's size and time but another inode -> not a rename.
    new = Manifest(["e", "a", "b", "c2", "f2", "h", "x"], [5, 1, 9, 3, 6, 8, 4], [50, 10, 20, 30, 60, 80, 40],
                   [5, 1, 2, 3, 6, 8, 99])
    d = diff(old, new)
    assert d.remap.tolist() == [1, -1, 3, -1, 0, 4, -1]
    assert d.unchanged.tolist() == [[0, 1], [4, 0]] and d.changed.tolist() == [[1, 2]]
    assert d.renamed.tolist() == [[2, 3], [5, 4]]
    assert d.removed.tolist() == [3, 6] and d.added.tolist() == [5, 6]
    assert d.describe() == "2 images added, 2 removed, 1 changed, 2 renamed since the run started"
    assert diff(old, old).describe() == "no image added, removed or changed since the run started"
    # Two candidates on one side: no rename (a wrong match is worse than none).
    twin = Manifest(["p", "q"], [1, 1], [5, 5])
    assert remap(twin, Manifest(["r", "s"], [1, 1], [5, 5])).tolist() == [-1, -1]


# --------------------------------------------------------------------------- property: random trees
KINDS = ("png", "png", "png", "corrupt", "empty", "dangling", "link_file", "link_dir", "loop", "fifo", "self_link")
NAMES = (b"a", b"b", b"Z", b"a b", b"bad\xff\xfe", b"caf\xc3\xa9", b"x\x80")


@st.composite
def trees(draw):
    dirs = [b""]
    for _ in range(draw(st.integers(0, 4))):
        parent = draw(st.sampled_from(dirs))
        dirs.append(os.path.join(parent, draw(st.sampled_from(NAMES)) + b"d%d" % len(dirs)))
    files = []
    for i in range(draw(st.integers(0, 12))):
        files.append((draw(st.sampled_from(dirs)), draw(st.sampled_from(NAMES)) + b"%d" % i,
                      draw(st.sampled_from(KINDS)), draw(st.integers(0, 10**6)),
                      draw(st.sampled_from([b".png", b".PNG", b".jpg"]))))
    return dirs, files


def _build(base: bytes, dirs, files) -> tuple[dict[bytes, int], set[bytes]]:
    """Make the tree; returns ``{real path: identity}`` of the valid PNGs reachable and
    the keys (see ``_key``) of the entries that must be skipped."""
    root, outside = os.path.join(base, b"root"), os.path.join(base, b"outside")
    os.makedirs(outside)
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    png(os.path.join(root, b"top.png"), 60000)  # always one image at the top: a flat folder
    png(os.path.join(outside, b"o.png"), 60001)
    good, bad, outside_linked = {os.path.join(root, b"top.png"): 60000}, set(), False
    for i, (d, name, kind, seed, ext) in enumerate(files):
        path = os.path.join(root, d, name + (b"" if kind in ("link_dir", "loop") else ext))
        if kind == "png":
            png(path, i, (1 + seed % 9, 1 + seed // 9 % 7))
            good[path] = i
        elif kind in ("corrupt", "empty"):
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n" + bytes(seed % 50) if kind == "corrupt" else b"")
            bad.add(path)
        elif kind in ("dangling", "self_link"):
            os.symlink(b"nothere" if kind == "dangling" else name + ext, path)
            bad.add(path)
        elif kind == "fifo":
            os.mkfifo(path)
            bad.add(path)
        elif kind == "link_file" and good:
            os.symlink(sorted(good)[seed % len(good)], path)
        elif kind == "link_dir":
            outside_linked |= seed % 2 == 0
            os.symlink(outside if seed % 2 == 0 else os.path.join(root, dirs[seed % len(dirs)]), path)
        elif kind == "loop":
            os.symlink(b"." if seed % 2 else root, path)
    if outside_linked:
        good[os.path.join(outside, b"o.png")] = 60001
    return {os.path.realpath(p): i for p, i in good.items()}, bad


def _key(p: bytes) -> bytes:
    """A listed entry's identity: its real path, or for a broken link the link itself."""
    if os.path.islink(p) and not os.path.exists(p):
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return os.path.realpath(p)


@given(trees())
@FAST
def test_property_any_tree_scans_once_per_real_file_and_identically_twice(tree):
    dirs, files = tree
    with tempfile.TemporaryDirectory() as tmp:
        base = os.fsencode(tmp)
        good, bad = _build(base, dirs, files)
        os.environ["DEEPCLUSTER_CACHE"] = os.path.join(tmp, "cache")  # the fixture's does not reset per example
        first = scan(os.path.join(base, b"root"), max_bad_fraction=1.0)
        second = scan(os.path.join(base, b"root"), max_bad_fraction=1.0)  # from the memo
        listed = [os.fsencode(p) for p in first.paths]
        assert sorted(_key(p) for p in listed) == sorted(good)  # each real file once
        assert [ident_of(first.load(i)) for i in range(len(first))] == [good[_key(p)] for p in listed]
        skipped = [os.fsencode(parse_display_path(p)) for p, _ in first.skipped]
        assert sorted(_key(p) for p in skipped) == sorted(_key(p) for p in bad)
        assert all(isinstance(r, str) and r for _, r in first.skipped)
        assert (second.paths, second.skipped) == (first.paths, first.skipped)


# --------------------------------------------------------------------------- property: remap
@st.composite
def histories(draw):
    n = draw(st.integers(1, 14))
    ops = draw(st.lists(st.tuples(st.sampled_from(["rename", "move", "delete", "add", "rewrite"]),
                                  st.integers(0, 10**6)), max_size=10))
    return n, ops


@given(histories())
@FAST
def test_property_remap_sends_every_surviving_file_to_its_row_and_never_to_a_wrong_one(history):
    n, ops = history
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "moved").mkdir(parents=True)
        os.environ["DEEPCLUSTER_CACHE"] = os.path.join(tmp, "cache")
        clock = iter(range(1_600_000_000 * 10**9, 1_700_000_000 * 10**9, 10**9))
        # Every write gets its own modification time: the kernel's clock is coarse (ms),
        # and two files written in one tick with one size are indistinguishable by
        # (size, mtime) - a documented limit, not what this property is about.
        def write(path: Path, ident: int) -> None:
            png(path, ident, (1 + ident % 5, 2))
            t = next(clock)
            os.utime(path, ns=(t, t))

        for i in range(n):
            write(root / f"f{i:02d}.png", i)
        old_src = scan(root)
        old = Manifest.from_source(old_src)
        old_ids = [ident_of(old_src.load(i)) for i in range(len(old_src))]
        next_id, survivors = n, set(range(n))  # identities whose content never changed
        for op, seed in ops:
            current = sorted(root.rglob("*.png"))
            if op == "add" or not current:
                write(root / f"new{next_id}.png", next_id)
                next_id += 1
                continue
            path = current[seed % len(current)]
            with Image.open(path) as img:
                ident = ident_of(img)
            if op in ("rename", "move"):
                path.rename((root / "moved" if op == "move" else root) / f"r{seed}_{path.name}")
            elif op == "delete":
                path.unlink()
                survivors.discard(ident)
            else:  # rewrite in place with a new identity
                write(path, next_id)
                survivors.discard(ident)
                next_id += 1
        new_src = scan(root)
        new_ids = [ident_of(new_src.load(i)) for i in range(len(new_src))]
        m = remap(old, Manifest.from_source(new_src))
        for row, target in enumerate(m.tolist()):
            if target >= 0:
                assert new_ids[target] == old_ids[row]  # never a wrong row
            else:
                assert old_ids[row] not in survivors or old_ids[row] not in new_ids
        mapped = {old_ids[r] for r in range(len(m)) if m[r] >= 0}
        assert mapped == survivors & set(new_ids)  # every surviving file found
