"""SCAN through the network (``deepcluster.scan_net``, ``cluster --method scan-net``):
no label is read, the run's network is left as it was, the strong view, the saved
network, the CLI's errors."""

import copy
import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import train_tiny
from deepcluster.checkpoint import load_model
from deepcluster.cli import main
from deepcluster.clustering import FinalClusteringError
from deepcluster.data import train_transform_from
from deepcluster.data.sources import ImageSource
from deepcluster.eval import open_checkpoint
from deepcluster.checkpoint import saved_config
from deepcluster.scan_net import (CUTOUT_AREA, SCAN_NET_EPOCHS, SELFLABEL_NET_EPOCHS, prototypes, scan_network,
                                  strong_transform)


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("scan-net") / "run")


@pytest.fixture(scope="module")
def ctx(tiny_run):
    return open_checkpoint(tiny_run, protocol="cluster", workers=0)


class _Relabelled(ImageSource):
    """``source``'s images with other labels (the images are the same objects)."""

    def __init__(self, source, labels):
        self.inner, self.labels, self.name = source, labels, source.name

    def __len__(self):
        return len(self.inner)

    def load(self, index):
        return self.inner.load(index)


def _run(ctx, source, **kw):
    x = np.asarray(ctx.store.get("train", ["fc7"])["fc7"], dtype=np.float32)
    weak = train_transform_from(ctx.data.spec, saved_config(ctx.state).augment)
    opts = dict(spec=ctx.data.spec, weak=weak, seed=0, epochs=1, selflabel_epochs=1, batch_size=64,
                n_heads=3, threshold=0.0, workers=0)
    opts.update(kw)
    return scan_network(ctx.model, source, x, 4, **opts)


def test_labels_never_enter_and_the_run_is_repeatable(ctx):
    source = ctx.data.train
    before = copy.deepcopy(ctx.model.state_dict())
    res, net = _run(ctx, source)
    # threshold 0: every image is a prototype, so the self-labelling stage did train
    assert res.info["prototypes"] == [240] and res.info["epochs"] == 1 and len(res.info["sizes"]) == 2
    assert res.assignments.shape == (240,) and set(np.unique(res.assignments)) <= set(range(4))
    assert np.all((res.confidence >= 0.25 - 1e-9) & (res.confidence <= 1.0))
    # the same images with shuffled labels, and with no labels at all: the same groups
    shuffled = np.random.default_rng(1).permutation(np.asarray(source.labels))
    for labels in (shuffled, None):
        again, _ = _run(ctx, _Relabelled(source, labels))
        np.testing.assert_array_equal(again.assignments, res.assignments)
        np.testing.assert_array_equal(again.confidence, res.confidence)
    # the run's network is untouched; the returned copy was trained and has its head at K
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.head.out_features == 4
    changed = [k for k, v in net.state_dict().items() if k in before and v.shape == before[k].shape
               and v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("features.") for k in changed)  # the conv stack was fine-tuned, not just heads


def test_prototypes_are_the_confident_images_and_each_groups_most_confident():
    p = np.array([[.995, .005], [.9, .1], [.8, .2], [.3, .7], [.4, .6], [.45, .55]])
    # quota ceil(0.5 * 6 / 2) = 2 per group: group 0 -> 0 (also above 0.99), 1; group 1 -> 3, 4
    np.testing.assert_array_equal(prototypes(p, 0.99), [0, 1, 3, 4])
    np.testing.assert_array_equal(prototypes(p, 0.99, share=1 / 6), [0, 3])  # quota 1
    np.testing.assert_array_equal(prototypes(p, 0.5, share=1 / 6), [0, 1, 2, 3, 4, 5])  # all above threshold
    q = np.array([[.999, .001]] * 3 + [[.6, .4]])  # group 1 empty; quota 1
    np.testing.assert_array_equal(prototypes(q, 0.99), [0, 1, 2])
    ties = np.array([[.7, .3]] * 4)  # equal confidences: the first members by index
    np.testing.assert_array_equal(prototypes(ties, 0.99), [0])


def test_another_seed_gives_another_training(ctx):
    a, _ = _run(ctx, ctx.data.train, selflabel_epochs=0)
    b, _ = _run(ctx, ctx.data.train, selflabel_epochs=0, seed=1)
    assert a.info["head_losses"] != b.info["head_losses"]


@pytest.mark.parametrize("kw, message", [
    ({"epochs": -1}, "epochs must be an integer >= 0"),
    ({"n_heads": 0}, "n_heads must be an integer >= 1"),
    ({"threshold": 1.5}, "threshold must be in [0, 1]"),
])
def test_bad_settings_are_refused(ctx, kw, message):
    with pytest.raises(FinalClusteringError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _run(ctx, ctx.data.train, **kw)


def test_features_must_match_the_images(ctx):
    weak = train_transform_from(ctx.data.spec, saved_config(ctx.state).augment)
    with pytest.raises(FinalClusteringError, match="239 feature rows for 240 images"):
        scan_network(ctx.model, ctx.data.train, np.ones((239, 8), np.float32), 4, spec=ctx.data.spec, weak=weak)
    with pytest.raises(FinalClusteringError, match="K=300 groups asked of only N=240 rows"):
        scan_network(ctx.model, ctx.data.train, np.ones((240, 8), np.float32), 300, spec=ctx.data.spec, weak=weak)


def test_strong_view_is_weak_then_randaugment_then_cutout():
    weak = T.Compose([T.RandomResizedCrop(28, scale=(0.5, 1.0)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    strong = strong_transform(weak)
    kinds = [type(op) for op in strong.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandAugment, T.ToTensor, T.Normalize, T.RandomErasing]
    assert len(weak.transforms) == 3  # the weak transform is not changed
    torch.manual_seed(0)
    img = Image.fromarray(np.full((28, 28, 3), 200, np.uint8))
    for _ in range(5):
        out = strong(img)
        side = round((CUTOUT_AREA * 28 * 28) ** 0.5)
        assert (out == 0).all(0).sum() >= side * side  # a zeroed square of a quarter of the image
    with pytest.raises(ValueError, match="no ToTensor"):
        strong_transform(T.Compose([T.RandomHorizontalFlip()]))


def test_cli_writes_groups_and_a_network_every_eval_reads(tiny_run, tmp_path):
    out, net = tmp_path / "g.csv", tmp_path / "net"
    assert main(["cluster", str(tiny_run), "--k", "3", "--method", "scan-net", "--epochs", "1",
                 "--selflabel-epochs", "0", "--workers", "0", "-o", str(out), "--save-network", str(net)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 240 and {int(r["cluster"]) for r in rows} <= {0, 1, 2}
    model, state = load_model(net / "checkpoint.pt")
    assert model.head.out_features == 3 and state["meta"]["method"] == "scan-net"
    assert state["scan_net"]["k"] == 3 and state["scan_net"]["epochs"] == 1
    assert main(["eval", "knn", "--checkpoint", str(net), "--workers", "0"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--method", "kmeans", "--epochs", "2"], "--epochs is an option of --method scan-net only"),
    (["--method", "spectral", "--save-network", "x"], "--save-network is an option of --method scan-net only"),
    (["--method", "scan-net", "--epochs", "-1"], "epochs must be an integer >= 0"),
])
def test_cli_errors_are_one_line(tiny_run, capsys, args, message):
    assert main(["cluster", str(tiny_run), "--k", "3", *args, "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_help_states_the_module_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"SCAN-step epochs (default {SCAN_NET_EPOCHS})" in out
    assert f"self-labelling epochs (default {SELFLABEL_NET_EPOCHS}; 0 skips it)" in out
