"""The final clustering stage: ``K`` groups a user can trust, from features at any ``k``.

DeepCluster trains with many clusters (k = 100 and more); a user asks for ``K`` groups
(say 10). Every method here takes the features of ``N`` images and returns exactly one
group in ``[0, K)`` per image, a confidence in ``[0, 1]`` and the distance to the group's
centre. Arrays in, assignments out: nothing here knows about models, data or runs.

Every method first L2-normalises the rows (the space DeepCluster clusters in; pass
``normalize=False`` to skip it), and the ``centres`` and ``distance`` of the result are
always measured in that space, so the methods can be compared row by row:

- ``kmeans``: the evaluation protocol of ``deepcluster eval clusters`` (faiss k-means,
  lowest loss of a few restarts). The baseline.
- ``spectral``: normalised spectral clustering (Ng, Jordan & Weiss, NIPS 2001) of the
  symmetric kNN graph: the ``K`` leading eigenvectors of ``D^-1/2 W D^-1/2``, rows
  L2-normalised, then k-means.
- ``leiden``: Leiden communities (Traag, Waltman & van Eck, Sci. Rep. 2019) of the same
  graph, the resolution searched for exactly ``K`` communities.
- ``umap-gmm``: the N2D recipe (McConville et al., ICPR 2020): UMAP to ``K`` dimensions
  (20 neighbours, ``min_dist`` 0), then a full-covariance Gaussian mixture;
  ``umap-kmeans`` runs k-means on the same embedding instead.
- ``merge``: a run's own ``k_fine`` training clusters merged into ``K`` by average-linkage
  agglomeration on how often their members are each other's nearest neighbours.
- ``scan``: SCAN (Van Gansbeke et al., ECCV 2020) on the frozen features: linear heads
  trained so that neighbours agree, then self-labelling of the confident rows
  (:mod:`deepcluster.clustering.scan`, which says what stands in for its augmentations).

``spectral``, ``kmeans``, ``merge`` and ``scan`` need only the core dependencies (faiss, scipy);
``leiden`` needs leidenalg and igraph, the UMAP methods umap-learn and scikit-learn
(``pip install 'deepcluster[cluster]'``). They are imported when a method runs.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from .kmeans import KMeansResult, kmeans
from .pic import knn_graph
from .preprocess import l2_normalize

logger = logging.getLogger(__name__)

__all__ = ["FINAL_METHODS", "FinalClusteringError", "FinalClusters", "MissingDependencyError", "final_clustering",
           "final_kmeans", "final_leiden", "final_merge", "final_spectral", "final_umap_gmm", "final_umap_kmeans"]

# --------------------------------------------------------------------------- defaults
# Fixed once for every data set; no label was used to choose any of them. They are the
# published defaults of each method (sources in the comments), not tuned on our data.

# k-means: 20 Lloyd iterations (the paper, Section 3.3) and the lowest loss of 3 restarts
# (the n_init of `deepcluster eval clusters`; choosing by loss uses no label).
KMEANS_NITER = 20
KMEANS_N_INIT = 3
# Spectral: 10 neighbours, scikit-learn's default for SpectralClustering's kNN affinity.
SPECTRAL_NEIGHBORS = 10
# Shift of the eigensolver (numerics, not a modelling choice): see _spectral_embedding.
SPECTRAL_SHIFT = 1e-3
# Leiden: 15 neighbours, the default of scanpy.pp.neighbors, the usual Leiden pipeline.
LEIDEN_NEIGHBORS = 15
# Resolution searched by bisection of its logarithm over [1e-3, 1e3] (the community
# count grows with it; 1 is the modularity of Newman & Girvan), at most 30 runs.
LEIDEN_RESOLUTION_RANGE = (1e-3, 1e3)
LEIDEN_SEARCH_STEPS = 30
# UMAP as in N2D (McConville et al. 2020, Section 3): n_components = K, 20 neighbours,
# min_dist 0 (points of a cluster packed tightly); a full-covariance mixture on top.
UMAP_NEIGHBORS = 20
UMAP_MIN_DIST = 0.0
GMM_COVARIANCE = "full"
# Merge: 10 neighbours, as for spectral (the same kind of kNN-graph statistic).
MERGE_NEIGHBORS = 10

_INSTALL = "pip install 'deepcluster[cluster]'"
# import name -> what to pip install
_PACKAGES = {"leidenalg": "leidenalg", "igraph": "igraph", "umap": "umap-learn", "sklearn.mixture": "scikit-learn"}


class FinalClusteringError(ValueError):
    """Bad input to a final clustering method (the message names the argument)."""


class MissingDependencyError(FinalClusteringError, ImportError):
    """An optional package a method needs is not installed (the message says which)."""


@dataclass
class FinalClusters:
    """Outcome of a final clustering method.

    Attributes:
        assignments: ``(N,)`` int64 group of every row, in ``[0, K)``; groups are numbered
            by decreasing size (ties: by smallest member row).
        confidence: ``(N,)`` float64 in ``[0, 1]``. Centre-based methods (``kmeans``,
            ``spectral`` but see :func:`final_spectral`, ``umap-kmeans``): ``1 - d1 / d2``,
            the margin between the nearest and second-nearest centre in the space the
            method clustered (0 on the border, 1 at a centre); ``umap-gmm``: the
            posterior probability of the group; graph methods (``leiden``, ``merge``):
            the share of the row's nearest neighbours in its group.
        distance: ``(N,)`` float32 Euclidean distance of the (L2-normalised) row to its
            group's centre.
        centres: ``(K, D)`` float32 mean of each group's (L2-normalised) rows.
        method: the method's name in :data:`FINAL_METHODS`.
        k: ``K``.
        seconds: wall time of the call.
        info: what the method chose on the way (e.g. Leiden's resolution).
    """

    assignments: np.ndarray
    confidence: np.ndarray
    distance: np.ndarray
    centres: np.ndarray
    method: str
    k: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        """``(K,)`` int64 rows per group."""
        return np.bincount(self.assignments, minlength=self.k)


# --------------------------------------------------------------------------- shared steps


def _require(module: str) -> Any:
    """Import an optional ``module`` or raise a one-line :class:`MissingDependencyError`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{_PACKAGES[module]} is not installed: {_INSTALL}") from None


def _prepare(x: np.ndarray, k: int, normalize: bool, method: str) -> np.ndarray:
    """Validate ``x`` ``(N, D)`` and ``k``; the float32 rows, L2-normalised if asked."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise FinalClusteringError(f"{method}: features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise FinalClusteringError(f"{method}: features must be real numbers, got dtype {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise FinalClusteringError(f"{method}: K must be an integer >= 1, got {k!r}")
    if k > x.shape[0]:
        n = x.shape[0]
        raise FinalClusteringError(f"{method}: K={k} groups asked of only N={n} rows; ask for K <= {n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = int((~np.isfinite(x)).any(1).sum())
    if bad:
        raise FinalClusteringError(f"{method}: features contain NaN or Inf in {bad} rows")
    return np.ascontiguousarray(l2_normalize(x), dtype=np.float32) if normalize else x


def _neighbors(z: np.ndarray, n_neighbors: int) -> np.ndarray:
    """``(N, m)`` int64 exact nearest neighbours of every row (itself excluded), with
    ``m = min(n_neighbors, N - 1)``, rows in (distance, index) order."""
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, numbers.Integral) or n_neighbors < 1:
        raise FinalClusteringError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    if z.shape[0] < 2:
        return np.zeros((z.shape[0], 0), dtype=np.int64)
    _, idx, _ = knn_graph(z, min(int(n_neighbors), z.shape[0] - 1))
    return idx


def _knn_matrix(idx: np.ndarray) -> scipy.sparse.csr_matrix:
    """``(N, N)`` float64 0/1 directed kNN matrix: ``A[i, j] = 1`` if ``j`` is among ``i``'s neighbours."""
    n, m = idx.shape
    return scipy.sparse.csr_matrix((np.ones(n * m), idx.ravel(), np.arange(0, n * m + 1, m)), shape=(n, n))


def _symmetric_graph(idx: np.ndarray) -> scipy.sparse.csr_matrix:
    """``W = (A + A^T) / 2`` of the kNN matrix: 1 for mutual neighbours, 1/2 for one-way
    (scikit-learn's ``precomputed_nearest_neighbors`` affinity)."""
    a = _knn_matrix(idx)
    return ((a + a.T) * 0.5).tocsr()


def _between(graph: scipy.sparse.spmatrix, labels: np.ndarray, c: int) -> np.ndarray:
    """``(c, c)`` float64 total edge weight from the rows of group ``a`` to those of ``b``."""
    n = labels.size
    member = scipy.sparse.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, c))
    return np.asarray((member.T @ graph @ member).todense())


def _lowest_loss_kmeans(z: np.ndarray, k: int, seed: int, n_init: int, niter: int) -> KMeansResult:
    """The lowest-loss of ``n_init`` faiss k-means runs on ``z`` ``(N, D)``, run ``i`` seeded ``seed + i``."""
    if isinstance(n_init, bool) or not isinstance(n_init, numbers.Integral) or n_init < 1:
        raise FinalClusteringError(f"n_init must be an integer >= 1, got {n_init!r}")
    z = np.ascontiguousarray(z, dtype=np.float32)
    runs = (kmeans(z, k, niter=niter, seed=seed + i, backend="faiss") for i in range(n_init))
    return min(runs, key=lambda r: r.loss)


def _margin(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(N,)`` ``1 - d1 / d2`` of each row of ``z`` ``(N, D)``: nearest and second-nearest
    of ``centroids`` ``(K, D)`` (Euclidean; 1 when ``K = 1``)."""
    if centroids.shape[0] < 2:
        return np.ones(z.shape[0])
    z64, c64 = z.astype(np.float64), centroids.astype(np.float64)
    sq = (z64 * z64).sum(1)[:, None] - 2.0 * z64 @ c64.T + (c64 * c64).sum(1)[None, :]
    two = np.sqrt(np.maximum(np.partition(sq, 1, axis=1)[:, :2], 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(two[:, 1] > 0, 1.0 - two[:, 0] / two[:, 1], 1.0)
    return np.clip(conf, 0.0, 1.0)


def _agreement(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(N,)`` share of each row's neighbours ``idx`` ``(N, m)`` in the row's group."""
    if idx.shape[1] == 0:
        return np.ones(labels.size)
    return (labels[idx] == labels[:, None]).mean(1)


def _finish(z: np.ndarray, labels: np.ndarray, k: int, confidence: np.ndarray, method: str, t0: float,
            info: dict[str, Any]) -> FinalClusters:
    """Renumber the groups by decreasing size; centres and distances in the space of ``z``."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, labels.size, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(labels.size))
    order = np.lexsort((first, -sizes))  # old numbers, largest group first
    new = np.empty(k, dtype=np.int64)
    new[order] = np.arange(k)
    labels = new[labels]
    sums = np.zeros((k, z.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, z.astype(np.float64))
    centres = sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]
    distance = np.linalg.norm(z.astype(np.float64) - centres[labels], axis=1)
    return FinalClusters(labels, np.asarray(confidence, dtype=np.float64), distance.astype(np.float32),
                         centres.astype(np.float32), method, int(k), time.perf_counter() - t0, info)


# --------------------------------------------------------------------------- methods


def final_kmeans(x: np.ndarray, k: int, seed: int = 0, *, n_init: int = KMEANS_N_INIT, niter: int = KMEANS_NITER,
                 normalize: bool = True) -> FinalClusters:
    """k-means into ``k`` groups on the L2-normalised rows: today's protocol, the baseline.

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``.
        seed: restart ``i`` is seeded ``seed + i``.
        n_init: restarts; the lowest k-means loss is kept (no label involved).
        niter: Lloyd iterations per restart (paper: 20).
        normalize: L2-normalise the rows first.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "kmeans")
    res = _lowest_loss_kmeans(z, k, seed, n_init, niter)
    return _finish(z, res.assignments, k, _margin(z, res.centroids), "kmeans", t0, {"loss": res.loss})


def _spectral_embedding(w: scipy.sparse.csr_matrix, k: int, seed: int) -> np.ndarray:
    """``(N, k)`` leading eigenvectors of ``M = D^-1/2 W D^-1/2`` (the ``k`` smallest of
    the normalised Laplacian ``I - M``), from a start vector drawn with ``seed``.

    The eigenvalues of ``M`` lie in ``[-1, 1]`` and the wanted ones crowd just below 1
    (exactly 1 once per connected component), where plain Lanczos returns vectors mixed
    across the gap. Shift-invert at ``1 + SPECTRAL_SHIFT`` spreads them apart
    (``1 / (1 + shift - lambda)``), at the price of one sparse LU factorisation.
    """
    from scipy.sparse.linalg import eigsh

    n = w.shape[0]
    d = 1.0 / np.sqrt(np.asarray(w.sum(1)).ravel())
    m = (scipy.sparse.diags(d) @ w @ scipy.sparse.diags(d)).tocsc()
    if k >= n - 1:  # ARPACK needs k < N - 1; a graph this small fits a dense solver
        _, vec = np.linalg.eigh(m.toarray())
        return vec[:, ::-1][:, :k]
    v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, n)
    _, vec = eigsh(m, k=k, sigma=1.0 + SPECTRAL_SHIFT, which="LM", v0=v0)
    return vec


def final_spectral(x: np.ndarray, k: int, seed: int = 0, *, n_neighbors: int = SPECTRAL_NEIGHBORS,
                   n_init: int = KMEANS_N_INIT, normalize: bool = True) -> FinalClusters:
    """Normalised spectral clustering (Ng, Jordan & Weiss 2001) of the symmetric kNN graph.

    The graph ``W = (A + A^T) / 2`` of the exact (faiss) kNN matrix ``A``; the ``K``
    leading eigenvectors of ``D^-1/2 W D^-1/2`` (scipy's ARPACK ``eigsh``), each row
    L2-normalised, then k-means. When the graph has ``K`` or more connected components,
    the eigenvalue 1 repeats at least ``K`` times and its eigenvectors only say which
    component a row is in (any ``K`` of them are as good): the components are then the
    groups, the smallest merged into the one with the nearest mean row until ``K`` remain
    (as for Leiden; confidence is then the neighbour agreement). Written out rather than scikit-learn's
    ``SpectralClustering`` so it needs no optional package, uses the same faiss kNN as
    the rest of the package, and seeds the eigensolver explicitly; the algorithm is the
    same (their ``precomputed_nearest_neighbors`` affinity is this ``W``).

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``.
        seed: seeds the eigensolver's start vector and the k-means restarts.
        n_neighbors: neighbours per row in the graph.
        n_init: k-means restarts on the embedding.
        normalize: L2-normalise the rows first.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "spectral")
    if z.shape[0] < 3:
        raise FinalClusteringError(f"spectral: needs at least 3 rows, got {z.shape[0]}")
    idx = _neighbors(z, n_neighbors)
    w = _symmetric_graph(idx)
    n_comp, comp = connected_components(w, directed=False)
    info = {"n_neighbors": idx.shape[1], "components": int(n_comp)}
    if n_comp >= k:  # the leading eigenspace only says which component a row is in
        labels = _merge_smallest(comp, w, z, k)
        return _finish(z, labels, k, _agreement(idx, labels), "spectral", t0, info)
    u = l2_normalize(_spectral_embedding(w, k, seed)).astype(np.float32)
    res = _lowest_loss_kmeans(u, k, seed, n_init, KMEANS_NITER)
    return _finish(z, res.assignments, k, _margin(u, res.centroids), "spectral", t0, info)


def _leiden_runner(w: scipy.sparse.csr_matrix, seed: int) -> Callable[[float], np.ndarray]:
    """A function ``resolution -> (N,) int64 membership`` of Leiden (RB configuration
    model, i.e. modularity with a resolution) on the undirected weighted graph ``w``."""
    igraph = _require("igraph")  # first: leidenalg itself imports igraph
    leidenalg = _require("leidenalg")
    upper = scipy.sparse.triu(w, k=1).tocoo()
    g = igraph.Graph(n=w.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist(), directed=False)
    weights = upper.data.tolist()

    def run(resolution: float) -> np.ndarray:
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights=weights,
                                        resolution_parameter=resolution, seed=seed, n_iterations=-1)
        return np.asarray(part.membership, dtype=np.int64)

    return run


def _search_resolution(run: Callable[[float], np.ndarray], k: int, steps: int) -> tuple[np.ndarray, float, int]:
    """Bisect ``log(resolution)`` over :data:`LEIDEN_RESOLUTION_RANGE` for ``k`` communities.

    Returns:
        ``(membership, resolution, runs)``: the first partition with exactly ``k``
        communities, else the one with the fewest communities above ``k`` (``None`` if
        every run gave fewer than ``k``).
    """
    lo, hi = (math.log(r) for r in LEIDEN_RESOLUTION_RANGE)
    best: tuple[np.ndarray, float] | None = None
    for step in range(1, steps + 1):
        res = math.exp((lo + hi) / 2)
        labels = run(res)
        c = int(labels.max()) + 1
        if c == k:
            return labels, res, step
        if c < k:
            lo = (lo + hi) / 2
        else:
            hi = (lo + hi) / 2
            if best is None or c < int(best[0].max()) + 1:
                best = (labels, res)
    if best is None:  # the midpoints never reached k: try the top of the range
        labels = run(LEIDEN_RESOLUTION_RANGE[1])
        return labels, LEIDEN_RESOLUTION_RANGE[1], steps + 1
    return best[0], best[1], steps


def _merge_smallest(labels: np.ndarray, w: scipy.sparse.spmatrix, z: np.ndarray, k: int) -> np.ndarray:
    """Merge the smallest group into its most-connected neighbour (most edge weight in
    ``w``) until ``k`` groups remain; a group with no edge out joins the group with the
    nearest mean row of ``z``. Ties go to the lower group number.

    Returns:
        ``(N,)`` int64 labels in ``[0, k)``.
    """
    _, labels = np.unique(labels, return_inverse=True)
    c = int(labels.max()) + 1
    links = _between(w, labels, c)
    np.fill_diagonal(links, 0.0)
    sizes = np.bincount(labels, minlength=c).astype(np.float64)
    sums = np.zeros((c, z.shape[1]))
    np.add.at(sums, labels, z.astype(np.float64))
    alive = np.ones(c, dtype=bool)
    into = np.arange(c)
    for _ in range(c - k):
        s = int(np.flatnonzero(alive)[np.argmin(sizes[alive])])
        row = np.where(alive, links[s], -1.0)
        row[s] = -1.0
        if row.max() > 0:
            t = int(np.argmax(row))
        else:
            dist = np.linalg.norm(sums / sizes[:, None] - sums[s] / sizes[s], axis=1)
            dist[~alive | (np.arange(c) == s)] = np.inf
            t = int(np.argmin(dist))
        links[t] += links[s]
        links[:, t] += links[:, s]
        links[t, t] = 0.0
        sizes[t] += sizes[s]
        sums[t] += sums[s]
        alive[s] = False
        into[into == s] = t
    _, compact = np.unique(into[labels], return_inverse=True)
    return compact.astype(np.int64)


def final_leiden(x: np.ndarray, k: int, seed: int = 0, *, n_neighbors: int = LEIDEN_NEIGHBORS,
                 steps: int = LEIDEN_SEARCH_STEPS, normalize: bool = True) -> FinalClusters:
    """Leiden communities of the symmetric kNN graph, at the resolution giving ``K`` of them.

    The resolution of the RB configuration model (modularity with a resolution) is
    bisected on a log scale over :data:`LEIDEN_RESOLUTION_RANGE`: the community count
    grows with it, but not one by one. When no run of the search gives exactly ``K``
    (the count jumps over ``K``, or the graph has more than ``K`` connected components),
    the partition with the fewest communities above ``K`` is taken and its smallest
    community is merged into its most-connected neighbour until ``K`` remain
    (``info["merged"]`` says how many merges that took).

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``.
        seed: Leiden's random seed.
        n_neighbors: neighbours per row in the graph.
        steps: bisection steps (Leiden runs).
        normalize: L2-normalise the rows first.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "leiden")
    if z.shape[0] == 1:
        return _finish(z, np.zeros(1, np.int64), k, np.ones(1), "leiden", t0, {})
    idx = _neighbors(z, n_neighbors)
    w = _symmetric_graph(idx)
    labels, resolution, runs = _search_resolution(_leiden_runner(w, seed), k, steps)
    found = int(labels.max()) + 1
    if found < k:
        raise FinalClusteringError(f"leiden: at most {found} communities at resolution {resolution:g}; "
                                   f"K={k} is out of reach, use another method")
    if found > k:
        logger.info("leiden: no resolution gave exactly %d communities; merging %d smallest of %d", k, found - k, found)
        labels = _merge_smallest(labels, w, z, k)
    info = {"resolution": resolution, "runs": runs, "communities": found, "merged": found - k}
    return _finish(z, labels, k, _agreement(idx, labels), "leiden", t0, info)


def _umap_embedding(z: np.ndarray, n_components: int, seed: int, n_neighbors: int, min_dist: float) -> np.ndarray:
    """``(N, n_components)`` float64 UMAP embedding of ``z`` ``(N, D)`` (umap-learn)."""
    umap = _require("umap")
    n_neighbors = max(2, min(int(n_neighbors), z.shape[0] - 1))
    reducer = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed)
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": reproducibility is the point
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return np.asarray(reducer.fit_transform(z), dtype=np.float64)


def final_umap_gmm(x: np.ndarray, k: int, seed: int = 0, *, n_components: int | None = None,
                   n_neighbors: int = UMAP_NEIGHBORS, min_dist: float = UMAP_MIN_DIST,
                   normalize: bool = True) -> FinalClusters:
    """N2D (McConville et al. 2020): UMAP to ``n_components`` (default ``K``) dimensions,
    then a Gaussian mixture of ``K`` full-covariance components (scikit-learn).

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``. A component the mixture leaves without rows
            leaves its group empty.
        seed: UMAP's and the mixture's random state.
        n_components, n_neighbors, min_dist: UMAP's (N2D: ``K``, 20, 0).
        normalize: L2-normalise the rows first.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "umap-gmm")
    mixture = _require("sklearn.mixture")
    e = _umap_embedding(z, n_components or k, seed, n_neighbors, min_dist)
    gmm = mixture.GaussianMixture(n_components=k, covariance_type=GMM_COVARIANCE, random_state=seed).fit(e)
    post = gmm.predict_proba(e)
    labels = post.argmax(1)
    return _finish(z, labels, k, post.max(1), "umap-gmm", t0, {"converged": bool(gmm.converged_)})


def final_umap_kmeans(x: np.ndarray, k: int, seed: int = 0, *, n_components: int | None = None,
                      n_neighbors: int = UMAP_NEIGHBORS, min_dist: float = UMAP_MIN_DIST,
                      n_init: int = KMEANS_N_INIT, normalize: bool = True) -> FinalClusters:
    """UMAP as in :func:`final_umap_gmm`, then k-means (lowest loss of ``n_init``) on the embedding.

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <= N``.
        seed: UMAP's random state and the k-means seeds.
        n_components, n_neighbors, min_dist: UMAP's (N2D: ``K``, 20, 0).
        n_init: k-means restarts.
        normalize: L2-normalise the rows first.
    """
    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "umap-kmeans")
    e = _umap_embedding(z, n_components or k, seed, n_neighbors, min_dist).astype(np.float32)
    res = _lowest_loss_kmeans(e, k, seed, n_init, KMEANS_NITER)
    return _finish(z, res.assignments, k, _margin(e, res.centroids), "umap-kmeans", t0, {"loss": res.loss})


def _fine_labels(fine: Any, n: int, k: int) -> tuple[np.ndarray, int]:
    """Validated fine assignments ``(N,)`` renumbered ``0..c-1``, and ``c``."""
    if fine is None:
        raise FinalClusteringError("merge: needs fine_assignments, the (N,) training clusters of the rows")
    fine = np.asarray(fine)
    if fine.shape != (n,) or not np.issubdtype(fine.dtype, np.integer) or (fine < 0).any():
        raise FinalClusteringError(f"merge: fine_assignments must be ({n},) non-negative integers, "
                                   f"got shape {fine.shape} dtype {fine.dtype}")
    _, labels = np.unique(fine, return_inverse=True)
    c = int(labels.max()) + 1
    if k > c:
        raise FinalClusteringError(f"merge: K={k} exceeds the {c} fine clusters; merging can only reduce them")
    return labels.astype(np.int64), c


def final_merge(x: np.ndarray, k: int, seed: int = 0, *, fine_assignments: np.ndarray | None = None,
                n_neighbors: int = MERGE_NEIGHBORS, normalize: bool = True) -> FinalClusters:
    """Merge a run's own training clusters into ``K`` groups.

    The affinity of fine clusters ``a`` and ``b`` is the share of ``a``'s kNN edges that
    land in ``b``, symmetrised: ``S_ab = (E_ab / (n_a m) + E_ba / (n_b m)) / 2`` with
    ``E_ab`` the number of rows of ``b`` among the ``m`` nearest neighbours of the rows
    of ``a``. Average-linkage (UPGMA) agglomeration on ``1 - S`` is cut at exactly ``K``
    groups (scipy). Deterministic: ``seed`` is accepted for the uniform signature.

    Args:
        x: ``(N, D)`` features.
        k: groups ``K``, ``1 <= K <=`` the number of fine clusters.
        fine_assignments: ``(N,)`` non-negative integers, the fine cluster of each row
            (e.g. the last epoch of a run's ``assignments.npy``); empty labels are ignored.
        n_neighbors: neighbours per row.
        normalize: L2-normalise the rows first.
    """
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    t0 = time.perf_counter()
    z = _prepare(x, k, normalize, "merge")
    fine, c = _fine_labels(fine_assignments, z.shape[0], k)
    idx = _neighbors(z, n_neighbors)
    if c == 1 or idx.shape[1] == 0:
        coarse = np.zeros(c, dtype=np.int64)
    else:
        edges = _between(_knn_matrix(idx), fine, c)
        share = edges / (np.bincount(fine, minlength=c)[:, None] * idx.shape[1])
        dist = 1.0 - (share + share.T) / 2.0
        np.fill_diagonal(dist, 0.0)
        tree = linkage(squareform(dist, checks=False), method="average")
        coarse = cut_tree(tree, n_clusters=k).ravel().astype(np.int64)
    labels = coarse[fine]
    return _finish(z, labels, k, _agreement(idx, labels), "merge", t0, {"fine_clusters": c})


from .scan import final_scan  # noqa: E402  (scan.py builds on the helpers above)

FINAL_METHODS: dict[str, Callable[..., FinalClusters]] = {
    "kmeans": final_kmeans,
    "spectral": final_spectral,
    "leiden": final_leiden,
    "umap-gmm": final_umap_gmm,
    "umap-kmeans": final_umap_kmeans,
    "merge": final_merge,
    "scan": final_scan,
}


def final_clustering(x: np.ndarray, k: int, method: str = "kmeans", seed: int = 0, **opts: Any) -> FinalClusters:
    """``FINAL_METHODS[method](x, k, seed, **opts)`` with the method and options checked.

    Raises:
        FinalClusteringError: unknown method or option, or bad input (one line).
        MissingDependencyError: the method's optional package is not installed.
    """
    if method not in FINAL_METHODS:
        raise FinalClusteringError(f"unknown final clustering method {method!r}; choose one of {list(FINAL_METHODS)}")
    fn = FINAL_METHODS[method]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("x", "k", "seed")]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise FinalClusteringError(f"{method}: unknown option(s) {unknown}; it takes {allowed}")
    return fn(x, k, seed, **opts)
