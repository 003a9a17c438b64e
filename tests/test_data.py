import numpy as np
import pytest
import torch
from PIL import Image

from deepcluster.data import (DataError, FolderSource, IndexedDataset, build_source, cluster_transform,
                              folder_image_size, image_spec, train_transform)


def test_fashion_mnist_from_a_data_root_of_gz_files(tiny_mnist_root):
    src = build_source("fashion-mnist", str(tiny_mnist_root), "train", download=False)
    assert len(src) == 240 and src.labels[:3].tolist() == [0, 1, 2]
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    ds = IndexedDataset(src, cluster_transform(image_spec("fashion-mnist")))
    x, i = ds[17]
    assert x.shape == (3, 28, 28) and i == 17
    torch.testing.assert_close(ds[17][0], x)  # deterministic
    test = build_source("fashion-mnist", str(tiny_mnist_root), "test", download=False)
    assert len(test) == 60


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="mnist not found"):
        build_source("mnist", str(tmp_path), download=False)
    with pytest.raises(DataError, match="unknown data set"):
        build_source("imagenet21k")


def _save(path, mode, size=(20, 16)):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(np.uint16)).save(path)
        return
    arr = rng.integers(0, 255, (*size[::-1], 4)).astype(np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    img.save(path)


def test_image_folder_tree_gives_labels(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            _save(tmp_path / c / f"{i}.png", "RGB")
    src = FolderSource(str(tmp_path))
    assert len(src) == 6 and src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_flat_folder_any_mode_and_bad_files_skipped(tmp_path):
    (tmp_path / "sub").mkdir()
    modes = {"a.png": "L", "b.jpg": "RGB", "c.png": "RGBA", "d.png": "P", "e.webp": "RGB", "f.bmp": "RGB",
             "g.tiff": "RGB", "sub/h.png": "LA", "i.jpg": "CMYK", "j.png": "I;16"}
    for name, mode in modes.items():
        _save(tmp_path / name, mode)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    src = FolderSource(str(tmp_path))
    assert src.labels is None
    skipped = {p.split("/")[-1] for p, _ in src.skipped}
    assert skipped >= {"empty.png", "text.jpg"}
    assert len(src) + len(src.skipped) == len(modes) + 3
    ds = IndexedDataset(src, train_transform(image_spec("folder", 16)))
    for i in range(len(ds)):
        x, idx = ds[i]
        assert x.shape == (3, 16, 16) and idx == i and torch.isfinite(x).all()


def test_loose_files_decode_as_the_training_source_does(tmp_path):
    """``assign`` and ``search`` read files with ``files.read_image``; a 16-bit grey or a
    transparent image must give the same pixels as the training source (``to_rgb``), not
    PIL's plain ``convert("RGB")`` (16-bit grey clipped to white, hidden colours leaking)."""
    from deepcluster.data.files import read_image

    for name, mode in {"wide.png": "I;16", "alpha.png": "RGBA", "grey.png": "L"}.items():
        _save(tmp_path / name, mode)
    src = FolderSource(str(tmp_path))
    for i, path in enumerate(src.paths):
        img, reason = read_image(path)
        assert reason == "" and np.array_equal(np.asarray(img), np.asarray(src.load(i))), path
    wide = np.asarray(read_image(str(tmp_path / "wide.png"))[0])
    with Image.open(tmp_path / "wide.png") as raw:
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.9  # what plain convert would have given
    assert (wide == 255).mean() < 0.1


def test_folder_image_size_is_the_median_shorter_side_within_28_224(tmp_path):
    def folder(name, sizes):
        d = tmp_path / name
        d.mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (i * 20, 0, 0)).save(d / f"{i}.png")
        return FolderSource(str(d))

    assert folder_image_size(folder("mixed", [(40, 30)] * 5 + [(600, 500)] * 3)) == 30
    assert folder_image_size(folder("odd", [(50, 64), (64, 48), (70, 90)])) == 50  # median of 50, 48, 70
    assert folder_image_size(folder("tiny", [(10, 12)] * 4)) == 28
    assert folder_image_size(folder("large", [(640, 480)] * 4)) == 224


def test_a_rescan_decodes_only_files_changed_since_the_last_scan(tmp_path, monkeypatch):
    import os

    from deepcluster.data import check

    monkeypatch.setenv("DEEPCLUSTER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        _save(folder / f"{i}.png", "RGB")
    (folder / "bad.png").write_bytes(b"junk")
    decoded = []
    real = check.check_image
    monkeypatch.setattr(check, "check_image", lambda p: decoded.append(os.path.basename(p)) or real(p))

    first = FolderSource(str(folder))
    assert sorted(decoded) == sorted([f"{i}.png" for i in range(6)] + ["bad.png"]) and len(first) == 6
    decoded.clear()
    second = FolderSource(str(folder))
    assert decoded == [] and second.paths == first.paths and second.skipped == first.skipped

    # A file rewritten since (here: truncated) is decoded again and now skipped; a new
    # one is decoded; a deleted one is gone.
    good = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(good[: len(good) // 2])
    _save(folder / "new.png", "RGB")
    (folder / "5.png").unlink()
    decoded.clear()
    third = FolderSource(str(folder))
    assert sorted(decoded) == ["2.png", "new.png"]
    assert sorted(os.path.basename(p) for p, _ in third.skipped) == ["2.png", "bad.png"]
    assert sorted(os.path.basename(p) for p in third.paths) == ["0.png", "1.png", "3.png", "4.png", "new.png"]


def test_an_unwritable_scan_cache_only_costs_the_rescan(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DEEPCLUSTER_CACHE", str(blocker / "cache"))
    for i in range(3):
        _save(tmp_path / f"{i}.png", "RGB")
    assert len(FolderSource(str(tmp_path))) == 3 and len(FolderSource(str(tmp_path))) == 3


def test_empty_or_mostly_broken_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no images"):
        FolderSource(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(str(tmp_path / "nope"))
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
    _save(tmp_path / "ok.png", "RGB")
    with pytest.raises(DataError, match="3 of 4 images .* unreadable"):
        FolderSource(str(tmp_path))


def test_blur_and_jitter_change_the_training_views_as_described():
    from deepcluster.data import image_spec, train_transform
    from deepcluster.data.transforms import blur_kernel

    assert [blur_kernel(s) for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 11, 23]
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB")
    spec = image_spec("fashion-mnist")
    plain = train_transform(spec, (1.0, 1.0), hflip=False)
    blurred = train_transform(spec, (1.0, 1.0), hflip=False, blur=1.0)
    jittered = train_transform(spec, (1.0, 1.0), hflip=False, jitter=1.0)

    def roughness(t):  # mean absolute difference of horizontal neighbours
        return (t[:, :, 1:] - t[:, :, :-1]).abs().mean().item()

    torch.manual_seed(0)
    x = plain(img)
    assert all(roughness(blurred(img)) < 0.9 * roughness(x) for _ in range(5))
    # jitter moves brightness/contrast in most draws (p = 0.8), never the pixel order
    changed = [not torch.allclose(jittered(img), x) for _ in range(20)]
    assert 10 <= sum(changed) < 20
