import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deepcluster.eval import FeatureStore, NetEncoder, PixelEncoder, load_eval_data, pool_side
from deepcluster.eval.context import results_dir_for
from deepcluster.models import create_model


def test_pool_side_picks_the_nearest_dimension():
    assert pool_side(96, 55, 9216) == 10  # 9600 (s=9 gives 7776)
    assert pool_side(256, 27, 9216) == 6  # exactly 9216
    assert pool_side(1, 28, 3072) == 28  # full resolution is below the target: no pooling
    assert pool_side(10, 4, 40) == 2
    assert pool_side(8, 10, 30) == 2  # 32 is nearer than 8 or 72
    # Tie between s=1 (|2-5|=3) and s=2 (|8-5|=3): the smaller side.
    assert pool_side(2, 4, 5) == 1
    with pytest.raises(ValueError):
        pool_side(0, 4, 10)


@pytest.mark.parametrize("arch,size,dims", [
    ("alexnet", 224, [9600, 9216, 9600, 9600, 9216]),  # the paper's Zhang et al. sizes
    ("alexnet_small", 28, [3072, 3200, 3072, 3072, 3200]),
])
def test_pooled_dimension_of_every_layer(arch, size, dims):
    enc = NetEncoder(create_model(arch, image_size=size, num_clusters=3), key="k")
    assert enc.layers == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert [enc.dims()[n]["dim"] for n in enc.layers] == dims


def test_net_encoder_matches_the_model_in_eval_mode():
    torch.manual_seed(0)
    model = create_model("alexnet_small", image_size=28, num_clusters=5)
    model.train()  # the encoder must freeze batch norm and dropout itself
    enc = NetEncoder(model, key="k")
    x = torch.randn(6, 3, 28, 28)
    out = enc(x, ["conv1", "conv5", "backbone", "fc7"])
    model.eval()
    with torch.no_grad():
        acts = model.forward_conv(x, ["conv1", "conv5"])
        torch.testing.assert_close(out["conv1"], torch.flatten(F.adaptive_avg_pool2d(acts["conv1"], 8), 1))
        torch.testing.assert_close(out["conv5"], torch.flatten(F.adaptive_avg_pool2d(acts["conv5"], 5), 1))
        torch.testing.assert_close(out["backbone"], torch.flatten(model.forward_backbone(x), 1))
        torch.testing.assert_close(out["fc7"], model.forward_features(x))
    assert out["conv1"].shape == (6, 3072) and out["conv5"].shape == (6, 3200)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn.num_batches_tracked.item() == 0  # running statistics never updated


def test_vgg_block_names_and_their_aliases_give_the_same_features():
    torch.manual_seed(0)
    enc = NetEncoder(create_model("vgg16", image_size=64, num_clusters=3, fc_dim=64), key="k")
    assert enc.layers == ["conv1", "conv2", "conv3", "conv4", "conv5"] and "conv3_1" in enc.all_layers
    out = enc(torch.randn(2, 3, 64, 64), ["conv3", "conv3_3", "conv3_1"])
    torch.testing.assert_close(out["conv3"], out["conv3_3"])
    assert out["conv3_1"].shape == out["conv3"].shape
    with pytest.raises(ValueError, match=r"unknown layer\(s\) conv9; this model has conv1, .*conv5 \(also conv1_1"):
        enc.check_layers(["conv9"])


def test_pixel_encoder_dimensions():
    assert PixelEncoder(28, channels=1).dims()["pixels"]["dim"] == 784
    assert PixelEncoder(32, channels=3).dims()["pixels"]["dim"] == 3072
    enc = PixelEncoder(224, channels=3)
    assert enc.dims()["pixels"]["pool"] == 55 and enc.dims()["pixels"]["dim"] == 3 * 55 * 55
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(PixelEncoder(28, channels=1)(x, ["pixels"])["pixels"], x[:, 0].reshape(2, -1))


def test_feature_store_rows_follow_image_index_and_cache(tiny_mnist_root, tmp_path):
    data = load_eval_data("fashion-mnist", str(tiny_mnist_root), 28, protocol="test", subset=50, test_subset=20)
    torch.manual_seed(0)
    enc = NetEncoder(create_model("alexnet_small", image_size=28, num_clusters=5), key="weights-a")
    store = FeatureStore(enc, data, tmp_path / "cache", batch_size=16)
    feats = store.get("test", ["conv3", "fc7"])
    assert store.extracted_images == 20 and feats["conv3"].dtype == np.float16
    # Reference: image i of the split through the encoder on its own.
    from deepcluster.data import cluster_transform
    t = cluster_transform(data.spec)
    for i in (0, 7, 19):
        ref = enc(t(data.test.load(i))[None], ["fc7"])["fc7"][0].numpy()
        np.testing.assert_allclose(feats["fc7"][i], ref, rtol=1e-4, atol=1e-5)
    again = FeatureStore(enc, data, tmp_path / "cache").get("test", ["conv3", "fc7"])
    np.testing.assert_array_equal(again["conv3"], feats["conv3"])
    # Other weights or another split are other files.
    enc_b = NetEncoder(enc.model, key="weights-b")
    other = FeatureStore(enc_b, data, tmp_path / "cache")
    other.get("test", ["fc7"])
    assert other.extracted_images == 20
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_results_dir_next_to_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    assert results_dir_for(tmp_path / "run") == tmp_path / "run" / "eval"
    assert results_dir_for(tmp_path / "run" / "checkpoint.pt") == tmp_path / "run" / "eval"
    assert results_dir_for(tmp_path / "sup.pt") == tmp_path / "sup_eval"
