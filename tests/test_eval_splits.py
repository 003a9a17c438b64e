import numpy as np
import pytest
from PIL import Image

from deepcluster.data import DataError
from deepcluster.eval import balanced_label_subset, load_eval_data, stratified_holdout
from deepcluster.eval.splits import fraction_tag, random_subset


def test_stratified_holdout_is_disjoint_complete_and_per_class():
    labels = np.repeat(np.arange(5), [10, 20, 30, 1, 40])
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert np.intersect1d(kept, held).size == 0 and len(kept) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=5).tolist() == [1, 2, 3, 0, 4]  # singleton class stays in kept
    again = stratified_holdout(labels, 0.1, seed=0)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(stratified_holdout(labels, 0.1, seed=1)[1], held)


def test_balanced_label_subset_is_class_balanced():
    labels = np.repeat(np.arange(4), [300, 250, 400, 50])
    picked = balanced_label_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[picked]).tolist() == [25, 25, 25, 25]  # 0.1 * 1000 / 4
    assert len(np.unique(picked)) == len(picked)
    # The fraction may refer to a larger set than the one drawn from.
    assert np.bincount(labels[balanced_label_subset(labels, 0.1, 0, total=2000)]).tolist() == [50, 50, 50, 50]
    assert np.bincount(labels[balanced_label_subset(labels, 0.5, 0)]).tolist() == [125, 125, 125, 50]


def test_label_fraction_that_empties_classes_is_refused():
    labels = np.repeat(np.arange(10), 24)
    msg = r"--label-fraction 0.01 leaves every class empty.*use --label-fraction >= 0.042"
    with pytest.raises(ValueError, match=msg):
        balanced_label_subset(labels, 0.01, seed=0)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        balanced_label_subset(labels, 0.0, seed=0)


def test_fraction_tag_and_subsets():
    assert [fraction_tag(f) for f in (0.01, 0.1, 0.005, 1.0)] == ["1pct", "10pct", "0.5pct", "100pct"]
    s = random_subset(100, 10, seed=3)
    assert len(s) == 10 and np.all(np.diff(s) > 0) and np.array_equal(s, random_subset(100, 10, seed=3))
    assert np.array_equal(random_subset(5, None, 0), np.arange(5))


def test_load_eval_data_splits(tiny_mnist_root):
    d = load_eval_data("fashion-mnist", str(tiny_mnist_root), 28, protocol="linear", subset=100, test_subset=30)
    assert len(d.train) == 100 and len(d.test) == 30 and d.num_classes == 10
    assert len(d.fit) + len(d.val) == 100 and np.intersect1d(d.fit, d.val).size == 0
    assert d.info["val_images"] == len(d.val) == 10
    assert d.keys["train"] != d.keys["test"]


def _write_images(folder, n, labelled):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / (f"class{i % 2}" if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(sub / f"img{i}.png")


def test_unlabelled_folder_is_refused_with_the_fix(tmp_path):
    _write_images(tmp_path / "flat", 6, labelled=False)
    with pytest.raises(DataError, match=r"linear needs labels but data set 'folder' at .*flat has none.*ImageFolder"):
        load_eval_data("folder", str(tmp_path / "flat"), 12, protocol="linear")


def test_labelled_folder_holds_out_a_test_part(tmp_path):
    _write_images(tmp_path / "tree", 20, labelled=True)
    d = load_eval_data("folder", str(tmp_path / "tree"), 12, protocol="linear")
    assert len(d.train) == 16 and len(d.test) == 4
    assert sorted(np.bincount(d.test_labels).tolist()) == [2, 2]
    assert set(d.train.paths).isdisjoint(d.test.paths)
