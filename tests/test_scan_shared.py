"""A folder is scanned once per run under torch.distributed: each rank decodes its share of
the files, the reasons are all-gathered, every rank ends with the same source (2 gloo ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_ranks
from deepcluster import distributed as D
from deepcluster.data import check as folder_check
from deepcluster.data.sources import FolderSource

pytestmark = pytest.mark.distributed

N_GOOD = 40


def make_folder(root: Path, extra: int = 0) -> list[str]:
    """Two classes of 20 PNGs (plus ``extra`` in class ``b``), a truncated PNG and a text
    file named ``.png``; returns the paths of the two bad files."""
    rng = np.random.default_rng(0)
    for i in range(N_GOOD + extra):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "notes.png").write_text("not an image\n")
    return [str(root / "a" / "truncated.png"), str(root / "b" / "notes.png")]


def build_counting(root: str) -> tuple[FolderSource, list[str]]:
    """``FolderSource(root)`` and the paths this process decoded while building it (calls
    of the check function, which the scan threads look up in the module)."""
    decoded: list[str] = []
    check = folder_check.check_image

    def counting(path: str) -> str | None:
        decoded.append(path)  # list.append is atomic under the GIL
        return check(path)

    folder_check.check_image = counting
    try:
        return FolderSource(root), decoded
    finally:
        folder_check.check_image = check


def summary(src: FolderSource, decoded: list[str]) -> dict:
    return {"paths": src.paths, "skipped": src.skipped, "labels": src.labels, "decoded": sorted(decoded),
            "sizes": src.sizes}


def _job_scan_three_times(root: str, cache: str) -> dict:
    """A fresh scan, a rescan (memo), a rescan after rank 0 changed one file."""
    os.environ["DEEPCLUSTER_CACHE"] = cache
    out = {"fresh": summary(*build_counting(root)), "again": summary(*build_counting(root))}
    D.barrier()
    if D.rank() == 0:
        changed = Path(root) / "b" / "001.png"
        Image.new("RGB", (16, 16), (1, 2, 3)).save(changed)  # a new size: the memo no longer trusts it
    D.barrier()
    out["changed"] = summary(*build_counting(root))
    return out


def _job_scan_own_folder(roots: list[str], cache: str) -> str:
    os.environ["DEEPCLUSTER_CACHE"] = cache
    try:
        FolderSource(roots[D.rank()])
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _ok(res: dict[int, tuple]) -> list:
    for r, (ok, val) in sorted(res.items()):
        assert ok, f"rank {r}: {val}"
    return [res[r][1] for r in sorted(res)]


def test_two_ranks_decode_each_file_once_in_total_and_build_the_same_source(tmp_path, monkeypatch):
    bad = make_folder(tmp_path / "imgs")
    monkeypatch.setenv("DEEPCLUSTER_CACHE", str(tmp_path / "cache-single"))
    reference, decoded_alone = build_counting(str(tmp_path / "imgs"))
    assert len(decoded_alone) == N_GOOD + 2 and len(reference) == N_GOOD
    assert [p for p, _ in reference.skipped] == sorted(bad)

    r0, r1 = _ok(run_ranks(_job_scan_three_times, root=str(tmp_path / "imgs"), cache=str(tmp_path / "cache-dist")))
    for phase in ("fresh", "again", "changed"):
        for r in (r0, r1):  # every rank has exactly the single process's source
            assert r[phase]["paths"] == r0[phase]["paths"] and r[phase]["skipped"] == r0[phase]["skipped"]
            np.testing.assert_array_equal(r[phase]["labels"], r0[phase]["labels"])
            np.testing.assert_array_equal(r[phase]["sizes"], r0[phase]["sizes"])
        assert r0[phase]["paths"] == reference.paths and r0[phase]["skipped"] == reference.skipped
        np.testing.assert_array_equal(r0[phase]["labels"], reference.labels)

    d0, d1 = r0["fresh"]["decoded"], r1["fresh"]["decoded"]
    assert not set(d0) & set(d1), "a file was decoded by both ranks"
    assert sorted(d0 + d1) == sorted(decoded_alone)  # each file once, the bad ones included
    assert abs(len(d0) - len(d1)) <= 1  # shard_indices: shares differ by at most one
    assert r0["again"]["decoded"] == [] and r1["again"]["decoded"] == []  # rank 0's memo, shared
    changed = str(tmp_path / "imgs" / "b" / "001.png")
    assert r0["changed"]["decoded"] + r1["changed"]["decoded"] == [changed]  # the changed file alone, once
    row = reference.paths.index(changed)
    assert r0["changed"]["sizes"][row] == r1["changed"]["sizes"][row] == os.path.getsize(changed)


def test_ranks_listing_different_files_all_fail_with_one_line(tmp_path):
    make_folder(tmp_path / "one")
    make_folder(tmp_path / "two", extra=1)  # rank 1 sees a folder with one image more
    msgs = _ok(run_ranks(_job_scan_own_folder, roots=[str(tmp_path / "one"), str(tmp_path / "two")],
                         cache=str(tmp_path / "cache")))
    for m in msgs:
        assert m.startswith("DataError: rank(s) 1 list other files under") and "\n" not in m, m
