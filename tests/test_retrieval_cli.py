"""End to end: `deepcluster index / search / duplicates` on a tiny folder with an
untrained network saved as a checkpoint."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.sparse.csgraph import connected_components

from deepcluster.checkpoint import save_checkpoint
from deepcluster.cli import main
from deepcluster.cli import search as cli_search
from deepcluster.data import cluster_transform, image_spec
from deepcluster.models import create_model
from deepcluster.retrieval import conv_map_fn, load_index, multiscale, rmac
from deepcluster.retrieval import images as retrieval_images


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    model = create_model("alexnet_small", num_clusters=4, image_size=28, width=0.25, fc_dim=64)
    meta = {"arch": "alexnet_small", "sobel": True, "image_size": 28, "width": 0.25, "fc_dim": 64}
    save_checkpoint({"model": model.state_dict(), "meta": meta, "config": {"data": {"name": "folder"}}}, path)
    return model.eval()


def _picture(rng, i):
    img = np.full((32, 32, 3), 20 * (i % 5), np.uint8)
    y, x = rng.integers(0, 20, 2)
    img[y:y + 12, x:x + 12] = rng.integers(60, 255, 3)
    img[:, (3 * i) % 32] = 255
    return Image.fromarray(img)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        _picture(rng, i).save(folder / f"{i:02d}.png")
    (folder / "copy_of_03.png").write_bytes((folder / "03.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    model = _checkpoint(tmp_path / "ck.pt", 0)
    return folder, model, tmp_path


def _index(tmp_path, folder, out, *extra):
    return main(["index", "--checkpoint", str(tmp_path / "ck.pt"), "--images", str(folder), "-o", str(out), *extra])


def _transformed(path):
    return cluster_transform(image_spec("folder", 28))(Image.open(path).convert("RGB"))[None]


def test_cli_choices_match_the_library():
    assert cli_search.FEATURES == retrieval_images.FEATURES


def test_index_and_search(setup, capsys):
    folder, model, tmp = setup
    out = tmp / "images.dcindex"
    assert _index(tmp, folder, out) == 0
    assert "11 images (flat, rmac 64-d); described 11, dropped 0, unreadable 1" in capsys.readouterr().out
    index = load_index(out)
    assert len(index) == 11 and str(folder / "broken.png") not in index.paths
    # the stored descriptor is R-MAC of the checkpoint's last conv map, at three scales
    x = _transformed(folder / "05.png")
    expected = multiscale(x, conv_map_fn(model), rmac).numpy()[0]
    stored = index.index.reconstruct(index.paths.index(str(folder / "05.png")))
    np.testing.assert_allclose(stored, expected, atol=1e-5)

    queries = [str(folder / "05.png"), str(folder / "broken.png"), str(tmp / "missing.png")]
    assert main(["search", str(out), *queries, "--top", "3", "--json"]) == 1
    captured = capsys.readouterr()
    answers = json.loads(captured.out)
    assert answers[0]["results"][0]["path"] == queries[0]
    assert answers[0]["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(answers[0]["results"]) == 3 and answers[1]["results"] == [] and answers[2]["error"] == "no such file"
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "broken.png" in errors[0] and "missing.png" in errors[1]
    assert main(["search", str(out), queries[0], "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == queries[0] and lines[1].split()[2] == queries[0] and len(lines) == 3


def test_fc7_index_holds_normalised_fc7(setup):
    folder, model, tmp = setup
    out = tmp / "fc7.dcindex"
    assert _index(tmp, folder, out, "--feature", "fc7") == 0
    index = load_index(out)
    with torch.no_grad():
        fc7 = model.forward_fc7(_transformed(folder / "07.png"))[0].numpy()
    stored = index.index.reconstruct(index.paths.index(str(folder / "07.png")))
    np.testing.assert_allclose(stored, fc7 / np.linalg.norm(fc7), atol=1e-5)
    assert index.meta.feature == "fc7" and index.meta.dim == 64


def test_incremental_reindex_describes_only_changed_files(setup, capsys):
    folder, _, tmp = setup
    out = tmp / "images.dcindex"
    assert _index(tmp, folder, out) == 0
    before = load_index(out)
    capsys.readouterr()
    changed = folder / "02.png"
    _picture(np.random.default_rng(9), 77).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime whatever the clock's resolution
    _picture(np.random.default_rng(8), 4).save(folder / "new.png")
    (folder / "09.png").unlink()
    assert _index(tmp, folder, out) == 0
    assert "11 images (flat, rmac 64-d); described 2, dropped 1, unreadable 1" in capsys.readouterr().out
    after = load_index(out)
    assert sorted(after.paths) == sorted(set(before.paths) - {str(folder / "09.png")} | {str(folder / "new.png")})
    for p in before.paths:
        if p not in (str(changed), str(folder / "09.png")):  # untouched files keep their vectors
            np.testing.assert_array_equal(after.index.reconstruct(int(after.ids[after.paths.index(p)])),
                                          before.index.reconstruct(int(before.ids[before.paths.index(p)])))
    assert not np.allclose(after.index.reconstruct(int(after.ids[after.paths.index(str(changed))])),
                           before.index.reconstruct(int(before.ids[before.paths.index(str(changed))])))


def test_duplicates_csv_matches_components(setup, capsys):
    folder, _, tmp = setup
    out = tmp / "images.dcindex"
    assert _index(tmp, folder, out) == 0
    csv_path = tmp / "dups.csv"
    threshold = 0.9999
    assert main(["duplicates", str(out), "--threshold", str(threshold), "-o", str(csv_path)]) == 0
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["path"])
    got = sorted(sorted(g) for g in groups.values())
    assert [str(folder / "03.png"), str(folder / "copy_of_03.png")] in got
    # reference: connected components of the thresholded similarity matrix of the stored vectors
    index = load_index(out)
    x = np.stack([index.index.reconstruct(int(i)) for i in index.ids])
    n, labels = connected_components(x @ x.T >= threshold, directed=False)
    expected = sorted(sorted(index.paths[i] for i in np.flatnonzero(labels == g))
                      for g in range(n) if (labels == g).sum() > 1)
    assert got == expected


def test_search_with_another_network_is_refused(setup, capsys):
    folder, _, tmp = setup
    out = tmp / "images.dcindex"
    assert _index(tmp, folder, out) == 0
    capsys.readouterr()
    _checkpoint(tmp / "other.pt", 1)
    assert main(["search", str(out), str(folder / "01.png"), "--checkpoint", str(tmp / "other.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds descriptors of checkpoint" in err and "the query side has" in err


def test_reindex_with_another_feature_needs_rebuild(setup, capsys):
    folder, _, tmp = setup
    out = tmp / "images.dcindex"
    assert _index(tmp, folder, out) == 0
    capsys.readouterr()
    assert _index(tmp, folder, out, "--feature", "fc7") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "feature rmac" in err[-1] and "feature fc7" in err[-1] and "--rebuild" in err[-1]
    assert load_index(out).meta.feature == "rmac"  # the refused update left the index as it was
    assert _index(tmp, folder, out, "--feature", "fc7", "--rebuild") == 0
    assert load_index(out).meta.feature == "fc7"


def test_whitened_index_stores_and_reuses_its_whitening(setup, capsys):
    import torch.nn.functional as F

    from deepcluster.clustering import PCAWhitening
    from deepcluster.retrieval import regional_descriptors

    folder, model, tmp = setup
    other = tmp / "other"
    other.mkdir()
    rng = np.random.default_rng(42)
    for i in range(8):
        _picture(rng, 100 + i).save(other / f"o{i}.png")
    out = tmp / "white.dcindex"
    assert _index(tmp, folder, out, "--whiten", str(other), "--whiten-dim", "16") == 0
    assert "11 images (flat, rmac 16-d)" in capsys.readouterr().out
    index = load_index(out)
    # reference: the whitening fitted here on every region of every scale of the other images
    conv = conv_map_fn(model)
    batch = torch.cat([_transformed(p) for p in sorted(other.glob("*.png"))])
    sample = [regional_descriptors(conv(F.interpolate(batch, size=(s, s), mode="bilinear", align_corners=False,
                                                      antialias=True) if s != 28 else batch)).flatten(0, 1)
              for s in (28, 20, 14)]  # round(28 / sqrt 2) = 20, 28 / 2 = 14
    white = PCAWhitening(16, whiten=True, normalize=True).fit(torch.cat(sample).numpy())
    x = _transformed(folder / "04.png")
    expected = multiscale(x, conv, lambda m: rmac(m, whitening=white)).numpy()[0]
    stored = index.index.reconstruct(int(index.ids[index.paths.index(str(folder / "04.png"))]))
    np.testing.assert_allclose(stored, expected, atol=1e-4)
    assert index.meta.params["whitening"] != "none" and index.meta.dim == 16
    # re-indexing without --whiten reuses the stored whitening: nothing to describe
    assert _index(tmp, folder, out) == 0
    assert "described 0, dropped 0" in capsys.readouterr().out
    # and the search side applies it: a query finds itself first
    assert main(["search", str(out), str(folder / "04.png"), "--top", "1", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert answer["path"] == str(folder / "04.png") and answer["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert _index(tmp, folder, tmp / "fc7w.dcindex", "--feature", "fc7", "--whiten", str(other)) == 1
    assert "whitening applies to rmac" in capsys.readouterr().err
