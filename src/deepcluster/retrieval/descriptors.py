"""Global image descriptors from a ReLU'd convolutional map: MAC, SPoC and R-MAC.

The paper (Caron et al. 2018, Section 4.4, "Instance retrieval") evaluates its features
on Oxford and Paris buildings with R-MAC on the last convolutional layer: "regional
max-pooling at 3 scales, L2, PCA-whitening learned on a different dataset, sum, L2"
(Tolias, Sicre, Jégou, "Particular object retrieval with integral max-pooling of CNN
activations", ICLR 2016). Everything here works on a map ``x`` of shape ``(B, C, H, W)``
(non-negative: taken after a ReLU) and returns ``(B, D)`` float32 tensors, one
L2-normalised row per image.

- :func:`mac`: global max-pooling, L2 (Tolias et al.; Razavian et al. 2016).
- :func:`spoc`: global sum-pooling, L2 (Babenko & Lempitsky, ICCV 2015, without their
  centre prior; whitening, when wanted, is applied by the caller).
- :func:`rmac`: max-pooling over the regions of :func:`rmac_regions`, L2 per region,
  PCA-whitening (optional), L2, sum over regions, L2.
- :func:`regional_descriptors`: the per-region L2-normalised max-pools, from which the
  whitening is learned on a *different* image set (e.g. Paris for Oxford and vice versa).
- :func:`multiscale`: a descriptor computed on the image at scales 1, 1/sqrt(2), 1/2,
  summed, then L2 (the usual multi-scale protocol of Radenović et al.).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # only the type; clustering is imported lazily where used
    from ..clustering import PCAWhitening
    from ..models import DeepClusterNet

# Tolias et al.'s reference code: desired overlap of neighbouring regions, and the numbers
# of regions along the long side of the map that are tried at the first level.
RMAC_OVERLAP = Fraction(2, 5)
RMAC_STEPS = (2, 3, 4, 5, 6, 7)
# The multi-scale protocol's image scales.
SCALES = (1.0, 2 ** -0.5, 0.5)
EPS = 1e-6


def _check_map(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"descriptors need a conv map of shape (B, C, H, W), got {shape}")
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"conv map has an empty spatial extent {tuple(x.shape[-2:])}")
    return x.float()


def _l2(x: torch.Tensor) -> torch.Tensor:
    """Rows (last dimension) scaled to unit L2 norm; ``EPS`` keeps all-zero rows at zero."""
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def _extra_regions(h: int, w: int) -> int:
    """How many more regions than at level 1 along the long side of an ``h x w`` map.

    Tolias et al. try ``s`` in ``RMAC_STEPS`` regions of side ``m = min(h, w)`` along
    the long side ``M``; their step is ``b = (M - m) / (s - 1)`` and the overlap of two
    neighbours ``(m^2 - m b) / m^2``. The ``s`` whose overlap is closest to 40 % wins
    (the first on a tie), and the long side gets ``s - 1`` regions more than the short
    one at every level. Computed in exact fractions, so no float rounding decides it.
    """
    m, big = min(h, w), max(h, w)
    errors = [abs(1 - Fraction(big - m, s - 1) / m - RMAC_OVERLAP) for s in RMAC_STEPS]
    return RMAC_STEPS[errors.index(min(errors))] - 1


def rmac_regions(h: int, w: int, levels: int = 3) -> np.ndarray:
    """The R-MAC region grid of Tolias, Sicre, Jégou (ICLR 2016) on an ``h x w`` map.

    The rule of their reference code (and of its port in Radenović et al.'s cirtorch):

    1. Row 0 is the whole map ``(0, 0, w, h)``.
    2. For ``l = 1 .. levels``: square regions of side ``s_l = floor(2 min(h, w) / (l + 1))``
       (a level where ``s_l`` is 0 has no region); ``n_l = l`` regions along the short
       side and ``l + d`` along the long one (``d = 0`` for a square map, else the value
       chosen by overlap closest to 40 %, see :func:`_extra_regions`). Along a side of
       length ``L`` with ``n`` regions the ``k``-th starts at ``floor(k (L - s_l) / (n - 1))``
       (0 when ``n = 1``): the first touches the start, the last the end.
    3. Regions are listed level by level, rows (y) outer, columns (x) inner.

    The reference computes the starts in floating point (``floor(s2 + k b) - s2``); here
    they are exact integer divisions, and the overlap choice is made in exact fractions
    (ties go to fewer regions, as Matlab's ``min`` does on equal values). Checked against a
    float32 port of cirtorch's ``rmac`` on every map from 1x1 to 59x59: the grids agree on
    all but 24 sizes, where float rounding moved a last start one cell short of the map's
    end (e.g. 2x32: start 30 instead of 31) or broke an exact tie of overlaps (3x11).
    At level 1 of a square map the region is the whole map again: it is kept, counted
    twice in the sum, as in cirtorch's ``rmac``.

    Args:
        h: map height (cells). w: map width (cells). levels: number of scales L (paper: 3).

    Returns:
        ``(R, 4)`` int64 array of ``(x, y, width, height)`` in map cells.
    """
    if h < 1 or w < 1:
        raise ValueError(f"R-MAC needs a map of at least 1x1 cells, got {h}x{w}")
    if levels < 1:
        raise ValueError(f"R-MAC levels must be >= 1, got {levels}")
    extra = _extra_regions(h, w)
    extra_w, extra_h = (extra, 0) if h < w else (0, extra) if h > w else (0, 0)
    regions = [(0, 0, w, h)]
    for level in range(1, levels + 1):
        side = 2 * min(h, w) // (level + 1)
        if side == 0:
            continue
        ys = _starts(h, side, level + extra_h)
        xs = _starts(w, side, level + extra_w)
        regions += [(x, y, side, side) for y in ys for x in xs]
    return np.asarray(regions, dtype=np.int64)


def _starts(length: int, side: int, n: int) -> list[int]:
    """``n`` evenly spread starts of a window of ``side`` along ``length`` (first at 0,
    last at ``length - side``)."""
    if n == 1:
        return [0]
    return [k * (length - side) // (n - 1) for k in range(n)]


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC: global max-pooling then L2, ``(B, C, H, W) -> (B, C)``."""
    x = _check_map(x)
    return _l2(x.amax(dim=(-2, -1)))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """SPoC: global sum-pooling then L2, ``(B, C, H, W) -> (B, C)`` (Babenko & Lempitsky
    2015, without the centre prior)."""
    x = _check_map(x)
    return _l2(x.sum(dim=(-2, -1)))


def regional_descriptors(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Max-pool over each R-MAC region, then L2 per region: ``(B, C, H, W) -> (B, R, C)``.

    ``R = len(rmac_regions(H, W, levels))``. Fit the R-MAC whitening on these (flattened
    to ``(B * R, C)``) from a different image set than the one searched.
    """
    x = _check_map(x)
    regions = rmac_regions(x.shape[-2], x.shape[-1], levels)
    pooled = [x[:, :, y:y + rh, rx:rx + rw].amax(dim=(-2, -1)) for rx, y, rw, rh in regions.tolist()]
    return _l2(torch.stack(pooled, dim=1))


def rmac(x: torch.Tensor, whitening: PCAWhitening | None = None, levels: int = 3) -> torch.Tensor:
    """R-MAC (Tolias et al. 2016) as the paper's retrieval experiment uses it.

    Regional max-pooling over :func:`rmac_regions` -> L2 -> PCA-whitening -> L2 -> sum
    over the regions -> L2.

    Args:
        x: ReLU'd conv map ``(B, C, H, W)``.
        whitening: a fitted :class:`deepcluster.clustering.PCAWhitening` (``whiten=True``,
            fitted on :func:`regional_descriptors` of a different image set) or None for
            no whitening.
        levels: number of region scales L (paper: 3).

    Returns:
        ``(B, C)`` without whitening, ``(B, whitening.dim)`` with it; rows L2-normalised.
    """
    regional = regional_descriptors(x, levels)  # (B, R, C)
    b, r, c = regional.shape
    if whitening is not None:
        if getattr(whitening, "projection", None) is None:
            raise ValueError("R-MAC whitening is not fitted; fit it on regional_descriptors of another image set")
        if whitening.projection.shape[0] != c:
            raise ValueError(f"R-MAC whitening was fitted on {whitening.projection.shape[0]}-d descriptors, "
                             f"the conv map has {c} channels")
        flat = whitening.transform(regional.reshape(b * r, c).cpu().numpy())
        regional = _l2(torch.from_numpy(np.ascontiguousarray(flat)).to(x.device).reshape(b, r, -1))
    return _l2(regional.sum(dim=1))


def _scaled_maps(images: torch.Tensor, conv_map: Callable[[torch.Tensor], torch.Tensor],
                 scales: Sequence[float]) -> Iterator[torch.Tensor]:
    """``conv_map`` of the batch resized to ``round(s H) x round(s W)`` for each scale ``s``
    (bilinear, anti-aliased; scale 1 is the batch itself)."""
    if images.ndim != 4:
        raise ValueError(f"multi-scale descriptors need images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    for s in scales:
        size = (max(1, round(s * images.shape[-2])), max(1, round(s * images.shape[-1])))
        scaled = images if size == tuple(images.shape[-2:]) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False, antialias=True)
        try:
            fmap = conv_map(scaled)
        except RuntimeError as e:  # a map that shrank to nothing inside the network (not, e.g., out of memory)
            if "too small" not in str(e) and "Kernel size" not in str(e):
                raise
            raise ValueError(f"images of {size[0]}x{size[1]} (scale {s:.3g}) are too small for the network; "
                             f"use larger images or fewer scales ({str(e).splitlines()[0]})") from None
        yield fmap


def multiscale(images: torch.Tensor, conv_map: Callable[[torch.Tensor], torch.Tensor],
               describe: Callable[[torch.Tensor], torch.Tensor] = rmac,
               scales: Sequence[float] = SCALES) -> torch.Tensor:
    """A descriptor summed over rescaled copies of the images, then L2.

    Each scale ``s`` resizes the batch to ``round(s H) x round(s W)`` (bilinear, with
    anti-aliasing), runs ``conv_map`` and ``describe``; the descriptors are summed and
    L2-normalised (Radenović et al.'s multi-scale protocol, scales 1, 1/sqrt(2), 1/2).

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        conv_map: images -> ReLU'd conv map ``(B, C, h, w)``, e.g. :func:`conv_map_fn`.
        describe: conv map -> ``(B, D)`` L2-normalised descriptors (:func:`rmac`,
            :func:`mac`, :func:`spoc`, or ``functools.partial(rmac, whitening=w)``).
        scales: the image scales (each > 0).

    Returns:
        ``(B, D)`` float32, rows L2-normalised.
    """
    return multiscale_many(images, conv_map, {"d": describe}, scales)["d"]


def multiscale_many(images: torch.Tensor, conv_map: Callable[[torch.Tensor], torch.Tensor],
                    describers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                    scales: Sequence[float] = SCALES) -> dict[str, torch.Tensor]:
    """Several :func:`multiscale` descriptors from one pass per scale: the conv map of
    each rescaled batch is computed once and given to every describer.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        conv_map: images -> ReLU'd conv map ``(B, C, h, w)``.
        describers: name -> conv map -> ``(B, D_name)`` (e.g. ``{"rmac": rmac, "mac": mac}``).
        scales: the image scales (each > 0).

    Returns:
        name -> ``(B, D_name)`` float32, rows L2-normalised (summed over scales, then L2).
    """
    sums: dict[str, torch.Tensor] = {}
    for fmap in _scaled_maps(images, conv_map, scales):
        for name, describe in describers.items():
            d = describe(fmap)
            sums[name] = d if name not in sums else sums[name] + d
    return {name: _l2(v) for name, v in sums.items()}


def multiscale_regions(images: torch.Tensor, conv_map: Callable[[torch.Tensor], torch.Tensor],
                       scales: Sequence[float] = SCALES, levels: int = 3) -> torch.Tensor:
    """The :func:`regional_descriptors` of every image at every scale, stacked:
    ``(B, 3, H, W) -> (M, C)``, what the whitening of a multi-scale R-MAC is fitted on."""
    return torch.cat([regional_descriptors(fmap, levels).flatten(0, 1)
                      for fmap in _scaled_maps(images, conv_map, scales)])


def last_conv_layer(model: DeepClusterNet) -> str:
    """Name of the model's last conv layer (``conv5`` for AlexNet)."""
    return max(model.conv_layers, key=model.conv_layers.__getitem__)


def conv_map_fn(model: DeepClusterNet, layer: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (B, 3, H, W) -> ReLU'd map (B, C, h, w)`` of ``layer`` (default: the last
    conv layer, before its max-pool, as in the original DeepCluster retrieval code).

    Puts ``model`` in eval mode (batch-norm statistics frozen); the map is computed
    without gradients on the model's device and returned there.
    """
    name = layer or last_conv_layer(model)
    if name not in model.conv_layers:
        raise ValueError(f"unknown layer {name!r}; this model has {list(model.conv_layers)}")
    model.eval()
    device = next(model.parameters()).device

    def conv_map(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_conv(images.to(device), [name])[name]

    return conv_map
