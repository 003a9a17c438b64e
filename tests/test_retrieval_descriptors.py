"""R-MAC region grid against grids derived by hand from Tolias et al.'s rule, and
MAC / SPoC / R-MAC against direct numpy computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcluster.clustering import PCAWhitening
from deepcluster.models import create_model
from deepcluster.retrieval import conv_map_fn, mac, multiscale, regional_descriptors, rmac, rmac_regions, spoc

# Hand-derived grids, (x, y, width, height). Derivations in the comments.
# 7x7 (square: no extra regions). Full map; l=1 side 7 at 0; l=2 side floor(14/3)=4,
# 2x2 starts 0,3; l=3 side floor(14/4)=3, 3x3 starts 0,2,4.
GRID_7x7 = [(0, 0, 7, 7), (0, 0, 7, 7),
            (0, 0, 4, 4), (3, 0, 4, 4), (0, 3, 4, 4), (3, 3, 4, 4)] + \
           [(x, y, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4)]
# h=4, w=6: steps s=2..7 give b = 2/(s-1) and overlap 1 - b/4 = .5, .75, ...: s=2 closest to
# .4, so one extra region along x. l=1 side 4: x 0,2 (b=2), y 0; l=2 side floor(8/3)=2:
# x in 3 starts 0,2,4, y in 2 starts 0,2; l=3 side 2: x in 4 starts floor(k*4/3) = 0,1,2,4,
# y in 3 starts 0,1,2.
GRID_4x6 = [(0, 0, 6, 4), (0, 0, 4, 4), (2, 0, 4, 4)] + \
           [(x, y, 2, 2) for y in (0, 2) for x in (0, 2, 4)] + \
           [(x, y, 2, 2) for y in (0, 1, 2) for x in (0, 1, 2, 4)]
# h=10, w=3: overlaps 1 - (7/(s-1))/3 = -1.33, -.17, .22, .417, .53, .61: s=5 (4 extra along y).
# l=1 side 3: y in 5 starts floor(k*7/4) = 0,1,3,5,7; l=2 side 2: y in 6 starts floor(k*8/5)
# = 0,1,3,4,6,8, x in 2 starts 0,1; l=3 side 1: y in 7 starts floor(k*9/6) = 0,1,3,4,6,7,9,
# x in 3 starts 0,1,2.
GRID_10x3 = [(0, 0, 3, 10)] + [(0, y, 3, 3) for y in (0, 1, 3, 5, 7)] + \
            [(x, y, 2, 2) for y in (0, 1, 3, 4, 6, 8) for x in (0, 1)] + \
            [(x, y, 1, 1) for y in (0, 1, 3, 4, 6, 7, 9) for x in (0, 1, 2)]
# 1x1: full map, l=1 side 1, l=2 and l=3 have side 0 (no region).
GRID_1x1 = [(0, 0, 1, 1), (0, 0, 1, 1)]


@pytest.mark.parametrize("h,w,grid", [(7, 7, GRID_7x7), (4, 6, GRID_4x6), (10, 3, GRID_10x3), (1, 1, GRID_1x1)])
def test_region_grid_matches_hand_derivation(h, w, grid):
    np.testing.assert_array_equal(rmac_regions(h, w), np.array(grid))


def test_region_grid_transposes_with_the_map():
    wide = rmac_regions(3, 10)
    assert len(wide) == len(GRID_10x3)
    assert sorted(map(tuple, wide[:, [1, 0, 3, 2]].tolist())) == sorted(GRID_10x3)


def test_regions_stay_inside_the_map_and_levels_count():
    for h, w in [(5, 9), (13, 6), (30, 40), (2, 17)]:
        for levels in (1, 2, 3, 4):
            r = rmac_regions(h, w, levels)
            assert (r[:, 0] >= 0).all() and (r[:, 1] >= 0).all()
            assert (r[:, 0] + r[:, 2] <= w).all() and (r[:, 1] + r[:, 3] <= h).all()
            assert len(np.unique(r[1:, 2])) <= levels
    with pytest.raises(ValueError, match="levels"):
        rmac_regions(4, 4, levels=0)
    with pytest.raises(ValueError, match="1x1"):
        rmac_regions(0, 4)


def _np_l2(v):
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def _np_regional(x, grid):
    # x (B, C, H, W) numpy; grid of (x, y, w, h)
    out = np.stack([x[:, :, y:y + h, c:c + w].max(axis=(2, 3)) for c, y, w, h in grid], axis=1)
    return _np_l2(out)


@pytest.fixture
def fmap():
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(3, 5, 4, 6)), 0).astype(np.float32)


def test_mac_and_spoc_match_numpy(fmap):
    np.testing.assert_allclose(mac(torch.from_numpy(fmap)).numpy(), _np_l2(fmap.max(axis=(2, 3))), rtol=1e-5)
    np.testing.assert_allclose(spoc(torch.from_numpy(fmap)).numpy(), _np_l2(fmap.sum(axis=(2, 3))), rtol=1e-5)


def test_rmac_without_whitening_matches_numpy(fmap):
    regional = _np_regional(fmap, GRID_4x6)  # (B, R, C)
    np.testing.assert_allclose(regional_descriptors(torch.from_numpy(fmap)).numpy(), regional, rtol=1e-5, atol=1e-6)
    expected = _np_l2(regional.sum(axis=1))
    np.testing.assert_allclose(rmac(torch.from_numpy(fmap)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_rmac_with_whitening_matches_numpy(fmap):
    rng = np.random.default_rng(1)
    other = np.maximum(rng.normal(size=(40, 5, 4, 6)), 0).astype(np.float32)  # a different image set
    train = regional_descriptors(torch.from_numpy(other)).reshape(-1, 5).numpy().astype(np.float64)
    white = PCAWhitening(dim=4, whiten=True, normalize=True, eps=0.0).fit(train)
    # Independent whitening: eigen-decomposition of the sample covariance, top 4, scaled by 1/sqrt(eig).
    mean = train.mean(0)
    val, vec = np.linalg.eigh(np.cov(train.T))
    top = np.argsort(val)[::-1][:4]
    proj = vec[:, top] / np.sqrt(val[top])
    regional = _np_regional(fmap.astype(np.float64), GRID_4x6)
    whitened = _np_l2((regional - mean) @ proj)
    expected = _np_l2(whitened.sum(axis=1))
    got = rmac(torch.from_numpy(fmap), whitening=white).numpy()
    assert got.shape == (3, 4)
    # component signs are a convention: compare magnitudes and the similarities between images
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got @ got.T, expected @ expected.T, rtol=1e-3, atol=1e-4)


def test_rmac_whitening_errors(fmap):
    x = torch.from_numpy(fmap)
    with pytest.raises(ValueError, match="not fitted"):
        rmac(x, whitening=PCAWhitening(dim=2))
    wrong = PCAWhitening(dim=2).fit(np.random.default_rng(0).normal(size=(20, 7)))
    with pytest.raises(ValueError, match="7-d"):
        rmac(x, whitening=wrong)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        rmac(x[0])


def test_multiscale_sizes_and_sum():
    images = torch.rand(2, 3, 8, 8)
    seen = []

    def record(m):
        seen.append(tuple(m.shape[-2:]))
        return mac(m)

    out = multiscale(images, torch.relu, describe=record)
    assert seen == [(8, 8), (6, 6), (4, 4)]  # 8, round(8 / sqrt 2) = 6, 4
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    np.testing.assert_allclose(multiscale(images, torch.relu, mac, scales=(1.0,)).numpy(),
                               _np_l2(images.numpy().max(axis=(2, 3))), rtol=1e-5)
    # a per-channel constant image has the same MAC at every scale, so the sum is that MAC
    const = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 9, 9).contiguous()
    np.testing.assert_allclose(multiscale(const, torch.relu, mac).numpy()[0], _np_l2(np.array([0.2, 0.5, 0.9])),
                               rtol=1e-5)


def test_multiscale_too_small_is_one_line_error():
    model = create_model("alexnet_small", num_clusters=3, image_size=28)
    with pytest.raises(ValueError, match="too small"):
        multiscale(torch.rand(1, 3, 2, 2), conv_map_fn(model))


def test_conv_map_fn_is_the_last_conv_relu():
    torch.manual_seed(0)
    model = create_model("alexnet_small", num_clusters=3, image_size=28)
    images = torch.rand(2, 3, 28, 28)
    fmap = conv_map_fn(model)(images)
    assert not model.training
    # conv5's ReLU is the last module before the final max-pool of the conv stack
    idx = model.conv_layers["conv5"]
    with torch.no_grad():
        ref = model.features[:idx + 1](model.sobel(images))
    torch.testing.assert_close(fmap, ref)
    assert (fmap >= 0).all() and fmap.shape[1] == 128
    with pytest.raises(ValueError, match="conv9"):
        conv_map_fn(model, "conv9")
