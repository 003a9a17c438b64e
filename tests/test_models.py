import pytest
import torch

from deepcluster.models import Sobel, create_model, list_models

SIZES = {"alexnet": 224, "alexnet_small": 28, "vgg16": 64}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("sobel", [True, False])
def test_every_registered_model_shapes(name, sobel):
    size = SIZES[name]
    m = create_model(name, sobel=sobel, num_clusters=7, image_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, m.feature_dim)
        assert m(x).shape == (2, 7)
        acts = m.forward_conv(x, ["conv1", "conv5"])
    assert acts["conv1"].ndim == 4 and acts["conv1"].min() >= 0  # ReLU'd
    first = m.features[0]
    assert first.in_channels == (2 if sobel else 3)


def test_alexnet_small_paper_shape_at_half_width():
    m = create_model("alexnet_small", image_size=28)
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 128, 192, 192, 128]
    assert m.feature_dim == 1024
    full = create_model("alexnet", image_size=224)
    assert [c.out_channels for c in full.features if isinstance(c, torch.nn.Conv2d)] == [96, 256, 384, 384, 256]
    assert full.feature_dim == 4096


def test_features_are_pre_relu_and_head_sees_relu():
    m = create_model("alexnet_small", num_clusters=5).eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        f = m.forward_features(x)
        assert (f < 0).any()  # before the last ReLU
        torch.testing.assert_close(m(x), m.head(torch.relu(f)))


def test_sobel_on_known_image():
    # A vertical step edge: gray = 1 on the right half. Sobel-x responds, Sobel-y does not
    # (away from the border).
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    out = Sobel()(img)
    assert out.shape == (1, 2, 8, 8)
    gx, gy = out[0, 0], out[0, 1]
    # gx kernel [[1,0,-1],[2,0,-2],[1,0,-1]] (cross-correlation): at columns 3 and 4 the
    # window straddles the step: 0*(1+2+1) - 1*(1+2+1) = -4.
    torch.testing.assert_close(gx[2:6, 3], torch.full((4,), -4.0))
    torch.testing.assert_close(gx[2:6, 4], torch.full((4,), -4.0))
    assert gx[2:6, :2].abs().max() == 0 and gx[2:6, 6].abs().max() == 0
    assert gy[1:7, 1:7].abs().max() == 0
    assert not any(p.requires_grad for p in Sobel().parameters())


def test_reset_head_new_weights_distribution():
    m = create_model("alexnet_small", num_clusters=5)
    old = m.head.weight
    m.reset_head(300, generator=torch.Generator().manual_seed(0))
    assert m.head.weight.shape == (300, 1024) and m.head.weight is not old
    w = m.head.weight.detach()
    assert abs(w.std().item() - 0.01) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert (m.head.bias == 0).all()
    a = create_model("alexnet_small")
    a.reset_head(3, generator=torch.Generator().manual_seed(1))
    b = create_model("alexnet_small")
    b.reset_head(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.head.weight, b.head.weight)


def test_unknown_arch_and_layer():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        create_model("resnet")
    m = create_model("alexnet_small")
    with pytest.raises(ValueError, match="conv9"):
        m.forward_conv(torch.zeros(1, 3, 28, 28), ["conv9"])
