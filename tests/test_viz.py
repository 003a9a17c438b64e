"""Figures: the mathematics behind each (against reference computations), the figures
themselves, the ``deepcluster viz`` commands and TensorBoard logging."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from conftest import train_tiny
from deepcluster.cli import main
from deepcluster.config import resolve
from deepcluster.data import Subset, build_source, image_spec, training_source
from deepcluster.models import create_model
from deepcluster.train import train
from deepcluster.viz import curves
from deepcluster.viz.activations import forward_pass, pick_filters, plot_top_images, top_activating
from deepcluster.viz.clusters import cluster_members, cluster_purity_of, contact_sheet, pick_clusters
from deepcluster.viz.filters import filter_grid, first_layer_filters
from deepcluster.viz.images import make_grid, save_png, to_display
from deepcluster.viz.neighbors import nearest_neighbors, neighbor_label_agreement
from deepcluster.config import DataConfig
from deepcluster.monitor import default_callbacks
from deepcluster.rundir import Run
from deepcluster.viz.synthesis import gaussian_blur, layer_mean_activations, noise_images, synthesize


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("viz") / "run", run={"seed": 3})


def _records(n=4):
    return [{"epoch": e, "convnet_loss": 3.0 - 0.1 * e, "clustering_loss": 0.9 - 0.05 * e,
             "nmi_labels": 0.3 + 0.05 * e, "nmi_prev": None if e == 0 else 0.5 + 0.1 * e,
             "cluster_size_min": 10 + e, "cluster_size_median": 50.0, "cluster_size_max": 200 - e,
             "empty_reseeded": 0, "extract_s": 1.0, "pca_s": 0.5, "kmeans_s": 0.25, "train_s": 4.0,
             "epoch_s": 6.0} for e in range(n)]


# --------------------------------------------------------------------------- images

def test_make_grid_places_each_image_in_its_cell():
    imgs = np.stack([np.full((3, 2), v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)])  # (5, 3, 2) grey
    g = make_grid(imgs, ncols=2, pad=1, pad_value=1.0)
    assert g.shape == (3 * 4 + 1, 2 * 3 + 1, 3)
    for i, v in enumerate((0.1, 0.2, 0.3, 0.4, 0.5)):
        r, c = divmod(i, 2)
        np.testing.assert_allclose(g[1 + r * 4:1 + r * 4 + 3, 1 + c * 3:1 + c * 3 + 2], v)
    np.testing.assert_allclose(g[9:12, 4:6], 1.0)  # the empty sixth cell stays padding
    assert (g[0] == 1.0).all() and (g[:, 0] == 1.0).all()


def test_to_display_inverts_the_normalisation(tmp_path):
    spec = image_spec("fashion-mnist")
    px = torch.rand(2, 3, 5, 5)
    x = (px - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    np.testing.assert_allclose(to_display(x, spec.mean, spec.std), px.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    p = save_png(np.full((4, 6, 3), 0.5), tmp_path / "a.png", scale=3)
    with Image.open(p) as im:
        assert im.size == (18, 12) and im.getpixel((0, 0)) == (128, 128, 128)


# --------------------------------------------------------------------------- filters

def test_sobel_first_layer_filters_are_the_effective_kernel_on_the_grey_image():
    torch.manual_seed(0)
    model = create_model("alexnet_small", sobel=True, image_size=28).eval()
    kernels = first_layer_filters(model)  # (F, 7, 7)
    conv = model.features[0]
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        ref = conv(model.sobel(x)) - conv.bias.view(1, -1, 1, 1)  # conv1 o Sobel, pre-BN, no bias
        grey = x.mean(1, keepdim=True).double()
        mine = torch.nn.functional.conv2d(grey, torch.from_numpy(kernels).unsqueeze(1))
    # conv1 has padding 2 and Sobel padding 1: compare where neither padding is involved.
    k = kernels.shape[-1]
    assert k == conv.kernel_size[0] + 2
    np.testing.assert_allclose(mine[0].numpy(), ref[0, :, 3:-3, 3:-3].double().numpy(), atol=1e-5)


def test_raw_rgb_filters_are_the_weights_and_grid_maps_zero_to_grey():
    model = create_model("alexnet_small", sobel=False, image_size=28)
    f = first_layer_filters(model)
    w = model.features[0].weight.detach().numpy()
    np.testing.assert_array_equal(f, w.transpose(0, 2, 3, 1))
    with torch.no_grad():
        model.features[0].weight.zero_()
    np.testing.assert_allclose(filter_grid(model, ncols=8, pad=0), 0.5)  # 48 filters fill 6 rows


# --------------------------------------------------------------------------- activations

def test_forward_pass_matches_the_model_and_top_activating_is_a_sort():
    torch.manual_seed(1)
    model = create_model("alexnet_small", image_size=28).eval()
    x = torch.randn(37, 3, 28, 28)
    p = forward_pass(model, x, ["conv2", "conv5"], batch_size=10)
    with torch.no_grad():
        np.testing.assert_allclose(p.features, model.forward_features(x).numpy(), rtol=1e-4, atol=1e-5)
        ref = model.forward_conv(x, ["conv2"])["conv2"].amax(dim=(2, 3)).numpy()
    np.testing.assert_allclose(p.scores["conv2"], ref, rtol=1e-4, atol=1e-5)
    top = top_activating(p.scores["conv5"], [0, 3, 7], k=9)
    for row, f in zip(top, [0, 3, 7]):
        s = p.scores["conv5"][:, f]
        assert list(s[row]) == sorted(s, reverse=True)[:9]
    assert top_activating(np.array([[1.0], [2.0], [2.0], [0.0]]), [0], 3).tolist() == [[1, 2, 0]]
    with pytest.raises(ValueError, match="out of range"):
        top_activating(p.scores["conv5"], [10_000])
    with pytest.raises(ValueError, match="does not exist.*conv1"):
        forward_pass(model, x, ["fc9"])


def test_pick_filters_skips_dead_filters():
    scores = np.zeros((5, 10))
    scores[:, [1, 4, 6]] = 1.0
    assert pick_filters(scores, 8) == [1, 4, 6]
    assert len(pick_filters(np.ones((5, 10)), 4, seed=2)) == 4


# --------------------------------------------------------------------------- synthesis

def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 3, 16, 12, dtype=torch.float64).float()
    sigma = 0.8
    mine = gaussian_blur(x, sigma).numpy()
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_synthesis_beats_every_noise_image_on_a_trained_first_layer(tiny_run):
    run = Run.load(tiny_run)
    model = run.model
    spec = run.spec
    with torch.no_grad():
        noise = noise_images(100, model.image_size, spec.mean, spec.std, grey=True, seed=12345)
        noise_act = layer_mean_activations(model, "conv1", noise)  # (100, C)
    filters = pick_filters(noise_act.numpy(), 6, seed=0)
    x = synthesize(model, "conv1", filters, spec.mean, spec.std, steps=60, seed=0)
    assert x.shape == (len(filters), 3, model.image_size, model.image_size)
    with torch.no_grad():
        act = layer_mean_activations(model, "conv1", x)
    for i, f in enumerate(filters):
        assert act[i, f] > noise_act[:, f].max(), f"filter {f}: {act[i, f]:.4f} vs noise {noise_act[:, f].max():.4f}"
    # pixels stay valid
    px = x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5


# --------------------------------------------------------------------------- neighbours

def test_nearest_neighbors_is_exact_cosine_and_excludes_the_query():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 8)).astype(np.float32)
    q = [0, 7, 49]
    nn = nearest_neighbors(f, q, k=5)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    for row, qi in zip(nn, q):
        sim = u @ u[qi]
        sim[qi] = -np.inf
        assert row.tolist() == np.argsort(-sim)[:5].tolist()
    labels = np.repeat([0, 1], 25)
    sep = np.concatenate([rng.normal(5, 0.1, (25, 8)), rng.normal(-5, 0.1, (25, 8))])
    assert neighbor_label_agreement(sep, labels, k=5) == 1.0


# --------------------------------------------------------------------------- clusters

def test_pick_clusters_and_purity():
    a = np.array([0] * 50 + [1] * 5 + [2] * 20 + [3] * 1 + [4] * 10 + [5] * 30)
    labels = np.zeros_like(a)
    labels[:10] = 1  # cluster 0: 40 of 50 in class 0
    picks = pick_clusters(a, n_largest=2, n_smallest=2, n_random=1, seed=0, labels=labels)
    assert [(p.cluster, p.kind) for p in picks[:4]] == [(0, "largest"), (5, "largest"), (3, "smallest"),
                                                      (1, "smallest")]
    assert picks[4].kind == "random" and picks[4].cluster in (2, 4)
    assert picks[0].purity == pytest.approx(0.8) and picks[0].majority == 0
    assert cluster_purity_of(a, labels, 3) == (1.0, 0)
    m = cluster_members(a, 0, 8, seed=1)
    assert len(m) == 8 and (a[m] == 0).all() and (np.diff(m) > 0).all()
    sheet = contact_sheet(lambda i: np.full((4, 4, 3), i / 100), m, ncols=4)
    assert sheet.shape == (2 * 5 + 1, 4 * 5 + 1, 3)


# --------------------------------------------------------------------------- curves

def test_curves_plot_the_records():
    rec = _records()
    fig = curves.plot_losses(rec)
    ys = [line.get_ydata().tolist() for ax in fig.axes for line in ax.get_lines()]
    assert ys == [[r["convnet_loss"] for r in rec], [r["clustering_loss"] for r in rec]]
    fig = curves.plot_cluster_sizes(rec)
    assert [r["cluster_size_max"] for r in rec] == fig.axes[0].get_lines()[0].get_ydata().tolist()
    fig = curves.plot_timings(rec)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sum(heights) == pytest.approx(sum(r["epoch_s"] for r in rec))
    sizes = np.array([0, 5, 7, 100, 3000, 40])
    fig = curves.plot_size_histogram(sizes)
    assert sum(p.get_height() for p in fig.axes[0].patches) == 5  # non-empty clusters
    assert "1 empty" in fig.axes[0].get_title()


# --------------------------------------------------------------------------- run data

def test_training_source_reproduces_the_subset_of_training(tiny_mnist_root):
    data = DataConfig(name="fashion-mnist", root=str(tiny_mnist_root), split="train", download=False, subset=50)
    s = training_source(data, seed=7)
    full = build_source("fashion-mnist", str(tiny_mnist_root), "train", False)
    expected = np.sort(np.random.default_rng(7).choice(len(full), 50, replace=False))
    assert isinstance(s, Subset) and s.indices.tolist() == expected.tolist()
    np.testing.assert_array_equal(s.labels, full.labels[expected])


# --------------------------------------------------------------------------- CLI

def test_viz_commands_write_pngs(tiny_run, tmp_path, capsys):
    out = tmp_path / "v"
    for args in (["curves"], ["filters"], ["top-images", "--layer", "conv3", "--num-filters", "4"],
                 ["synthesize", "--layer", "conv2", "--filters", "0,3", "--steps", "5"],
                 ["neighbors", "--queries", "3", "--k", "2"], ["clusters", "--largest", "1", "--smallest", "1",
                                                               "--random", "0"]):
        assert main(["viz", args[0], str(tiny_run), "--out", str(out), *args[1:]]) == 0, args
    printed = capsys.readouterr().out.split()
    assert len(printed) >= 10
    for p in printed:
        with Image.open(p) as im:
            im.load()
            assert im.size[0] > 50
    assert main(["viz", "top-images", str(tiny_run), "--layer", "conv9"]) == 1
    assert "layer 'conv9' does not exist" in capsys.readouterr().err
    assert main(["viz", "clusters", str(tiny_run), "--clusters", "99"]) == 1
    assert main(["viz", "curves", str(tmp_path)]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_plot_top_images_has_one_panel_per_filter():
    disp = np.random.default_rng(0).random((20, 8, 8, 3))
    fig = plot_top_images(disp, np.arange(18).reshape(2, 9), [4, 9], "conv3")
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "conv3 filter 9"


# --------------------------------------------------------------------------- TensorBoard

def test_tensorboard_writer_logs_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deepcluster.tensorboard import TensorBoardWriter, scalars

    model = create_model("alexnet_small", image_size=28).eval()
    w = TensorBoardWriter(tmp_path)
    rec = _records(2)
    for r in rec:
        w.log_epoch(r, model, torch.randn(16, 3, 28, 28))
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert set(scalars(rec[1])) <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("loss/convnet")] == pytest.approx([r["convnet_loss"] for r in rec])
    assert [e.step for e in acc.Scalars("nmi/vs_previous_epoch")] == [1]  # None at epoch 0 is not logged
    assert {"filters/conv1", "inputs/sample", "activations/conv5_top"} <= set(tags["images"])
    assert len(acc.Images("filters/conv1")) == 2 and len(acc.Images("inputs/sample")) == 1


def test_train_with_tensorboard_writes_events(tiny_mnist_root, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    cfg = resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False, "subset": 80},
                             "cluster": {"k": 5, "pca_dim": 16}, "optim": {"epochs": 1, "batch_size": 64},
                             "run": {"output_dir": str(out), "workers": 0, "tensorboard": True}})
    train(cfg, callbacks=default_callbacks(cfg))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
