"""Retrieval benchmarks: category retrieval on Fashion-MNIST, instance retrieval on
photographs, the near-duplicate threshold, and the speed of extraction and search.

Stand-ins, not the paper's experiments (Caron et al. 2018, Table 4: Oxford / Paris with
an ImageNet-trained AlexNet/VGG): neither data set nor ImageNet weights can be had here.

- ``category``: queries = Fashion-MNIST test images, database = training images,
  relevant = same class; mAP@all and mAP@1000 (:func:`deepcluster.retrieval.labelled_map`)
  of raw pixels (Euclidean distance), the random ``alexnet_small`` (torch seed 0, as a
  run seeded 0 starts) and every ``--checkpoint``: fc7 (before its ReLU, L2) and R-MAC of
  the last conv layer (3 levels, scales 1, 1/sqrt 2, 1/2, no whitening), inner product.
- ``instance``: the photograph benchmark of ``retrieval_photos.py``, revisited
  Easy / Medium / Hard mAP and mP@1,5,10 of R-MAC, MAC and SPoC (multi-scale, no
  whitening) of raw pixels (the 3-channel pixel map at 32 px, and a 32x32 tiny image),
  the random ``alexnet`` at 224 px, the random ``alexnet_small`` and each checkpoint at
  the network's own input size.
- ``duplicates``: precision / recall of the pairs inside :func:`near_duplicates` groups
  against the Easy pairs of the instance benchmark, over thresholds.
- ``speed``: R-MAC images/s on the CPU, and flat vs IVF-PQ search on N x 256 vectors.

Usage (one thread; ``--quick`` for a smoke test at toy sizes):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/retrieval.py [--quick] \\
        [--checkpoint NAME=PATH ...] [--parts category,instance,duplicates,speed] [--docs]

Writes ``--out`` (default ``docs/benchmarks/retrieval.json``; parts not run are kept
from an existing file) and, with ``--docs``, the tables into docs/RETRIEVAL.md and
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from deepcluster.checkpoint import load_model  # noqa: E402
from deepcluster.clustering import PCAWhitening  # noqa: E402
from deepcluster.data import ImageSpec, IndexedDataset, build_source, cluster_transform, image_spec  # noqa: E402
from deepcluster.features import eval_mode, iter_features, make_loader  # noqa: E402
from deepcluster.io import write_text  # noqa: E402
from deepcluster.metrics import rank_database, revisited_map  # noqa: E402
from deepcluster.models import DeepClusterNet, create_model  # noqa: E402
from deepcluster.retrieval import (IndexMeta, build_index, conv_map_fn, labelled_map, mac, multiscale,  # noqa: E402
                                   multiscale_many, multiscale_regions, near_duplicates, rmac, search, spoc)
from deepcluster.retrieval.images import checkpoint_spec  # noqa: E402
from deepcluster.runtime import seed_everything  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402
from retrieval_photos import DISTRACTOR_PHOTOS, PHOTOS, PhotoBenchmark, covered, distractors, make_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("category", "instance", "duplicates", "speed")
DESCRIBERS = {"rmac": rmac, "mac": mac, "spoc": spoc}
SIZES = {
    "quick": {"queries": 100, "database": 500, "photos": PHOTOS[:3], "queries_per_photo": 1, "views": 2,
              "photo_distractors": 8, "fmnist_distractors": 8, "alexnet_size": 96, "index_n": 2_000,
              "index_queries": 50, "speed_images": 8},
    "full": {"queries": 10_000, "database": 60_000, "photos": PHOTOS, "queries_per_photo": 3, "views": 4,
             "photo_distractors": 1000, "fmnist_distractors": 1000, "alexnet_size": 224, "index_n": 1_000_000,
             "index_queries": 200, "speed_images": 64},
}
THRESHOLDS = tuple(sorted({round(float(t), 2) for t in np.arange(0.3, 0.99, 0.05)} | {0.9, 0.95, 0.97, 0.99, 0.995}))


@dataclass
class Network:
    """A network to benchmark: its name, model (eval mode) and input spec."""

    name: str
    model: DeepClusterNet
    spec: ImageSpec


def random_network(arch: str, size: int, seed: int = 0) -> Network:
    """``arch`` with the initial weights of a run seeded ``seed`` (``seed_everything``
    before the model is built, as ``deepcluster train`` does); ImageNet statistics at
    224 px, Fashion-MNIST's for ``alexnet_small``."""
    seed_everything(seed)
    model = create_model(arch, num_clusters=100, image_size=size).eval()
    spec = image_spec("folder", size) if arch == "alexnet" else image_spec("fashion-mnist", size)
    return Network(f"random {arch} ({size} px)", model, spec)


def networks(args: argparse.Namespace, with_alexnet: bool) -> list[Network]:
    """The random networks, then one per ``--checkpoint NAME=PATH``."""
    nets = [] if args.no_baselines else [random_network("alexnet_small", 28)]
    if with_alexnet and not args.no_baselines:
        nets.insert(0, random_network("alexnet", SIZES[args.mode]["alexnet_size"]))
    for name, path in args.checkpoint:
        model, state = load_model(path)
        nets.append(Network(name, model, checkpoint_spec(state)))
    return nets


class ImageList(Dataset):
    """PIL images with a transform; item ``i`` is ``(transform(images[i]), i)``."""

    def __init__(self, images: list, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), i


def extract_all(forward: Callable, dataset: Dataset, batch_size: int = 64,
                sampler: list[int] | None = None) -> dict[str, np.ndarray]:
    """Several features in one :func:`iter_features` pass, rows in ``sampler`` order
    (default data-set order): name -> ``(N, D)`` float32."""
    order = np.arange(len(dataset)) if sampler is None else np.asarray(sampler)
    rows = np.argsort(order)
    parts: dict[str, list] = {}
    where: list[np.ndarray] = []
    for idx, out, _ in iter_features(forward, make_loader(dataset, batch_size, 0, sampler=list(map(int, order)))):
        where.append(rows[np.searchsorted(order, idx, sorter=rows)])
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    at = np.concatenate(where)
    result = {}
    for k, v in parts.items():
        x = np.empty((len(order), v[0].shape[1]), np.float32)
        x[at] = np.concatenate(v)
        result[k] = x
    return result


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------- category retrieval

def category_features(net: Network, source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """fc7 (L2) and multi-scale R-MAC of ``source``'s images ``indices``, one pass."""
    conv = conv_map_fn(net.model)

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"fc7": torch.nn.functional.normalize(net.model.forward_fc7(x), dim=1), "rmac": multiscale(x, conv)}

    with eval_mode(net.model):
        return extract_all(forward, IndexedDataset(source, cluster_transform(net.spec)), 256, list(map(int, indices)))


def run_category(args: argparse.Namespace) -> dict[str, Any]:
    """mAP@all and mAP@1000 of each feature on Fashion-MNIST (test queries, train database)."""
    size = SIZES[args.mode]
    test, train = build_source("fashion-mnist", split="test"), build_source("fashion-mnist", split="train")
    rng = np.random.default_rng(0)
    qi = np.sort(rng.choice(len(test), min(args.queries or size["queries"], len(test)), replace=False))
    di = np.sort(rng.choice(len(train), min(args.database or size["database"], len(train)), replace=False))
    ql, dl = test.labels[qi], train.labels[di]
    rows: dict[str, dict] = {}

    def score(name: str, q: np.ndarray, d: np.ndarray, metric: str, t0: float) -> None:
        rows[name] = {"map_all": labelled_map(q, d, ql, dl, None, metric)["map"],
                      "map_1000": labelled_map(q, d, ql, dl, 1000, metric)["map"],
                      "dim": int(q.shape[1]), "metric": metric, "seconds": time.perf_counter() - t0}
        print(f"category {name:40s} mAP@all {rows[name]['map_all']:.4f} mAP@1000 {rows[name]['map_1000']:.4f} "
              f"({rows[name]['seconds']:.0f} s)", flush=True)

    if not args.no_baselines:
        t0 = time.perf_counter()
        pixels = [np.stack([np.asarray(s.load(int(i)).convert("L"), np.float32).ravel() / 255 for i in idx])
                  for s, idx in ((test, qi), (train, di))]
        score("raw pixels", *pixels, "l2", t0)
    for net in networks(args, with_alexnet=False):
        t0 = time.perf_counter()
        q, d = category_features(net, test, qi), category_features(net, train, di)
        for feat in ("fc7", "rmac"):
            score(f"{net.name} {feat}", q[feat], d[feat], "ip", t0)
    return {"queries": len(qi), "database": len(di), "classes": int(len(np.unique(dl))), "rows": rows}


# ---------------------------------------------------------------- instance retrieval

def photo_transform(spec: ImageSpec) -> Callable:
    """Rendered square image -> ``(3, size, size)`` tensor normalised as the network was trained."""
    return T.Compose([T.Resize((spec.size, spec.size)), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def fit_whitening(net: Network, images: list) -> PCAWhitening:
    """The R-MAC PCA-whitening of ``net`` (all dimensions), learned on the regional
    descriptors (every region, every scale) of ``images``, a set disjoint from the benchmark."""
    conv = conv_map_fn(net.model)
    with eval_mode(net.model):
        rows = [out for _, out, _ in iter_features(lambda x: multiscale_regions(x, conv),
                                                   make_loader(ImageList(images, photo_transform(net.spec)), 32, 0))]
    x = np.concatenate(rows)
    return PCAWhitening(min(x.shape[1], len(x) - 1), whiten=True, normalize=True).fit(x)


def photo_descriptors(net: Network | None, images: list, whitening: PCAWhitening | None = None) -> dict[str, np.ndarray]:
    """R-MAC / MAC / SPoC (multi-scale) of ``images``, and ``rmac+w`` (R-MAC with
    ``whitening``) when given; ``net=None``: raw pixels (the 3-channel pixel map at 32 px,
    values in [0, 1], and the mean-centred 32x32 tiny image)."""
    if net is None:
        tf = T.Compose([T.Resize((32, 32)), T.ToTensor()])
        maps = torch.stack([tf(im) for im in images])
        out = {k: v.numpy() for k, v in multiscale_many(maps, lambda x: x, DESCRIBERS).items()}
        flat = maps.flatten(1).numpy()
        return {**out, "tiny": l2n(flat - flat.mean(1, keepdims=True))}
    conv = conv_map_fn(net.model)
    describers = dict(DESCRIBERS)
    if whitening is not None:
        describers["rmac+w"] = functools.partial(rmac, whitening=whitening)
    with eval_mode(net.model):
        return extract_all(lambda x: multiscale_many(x, conv, describers), ImageList(images, photo_transform(net.spec)), 32)


def _scores(queries: np.ndarray, database: np.ndarray, bench: PhotoBenchmark) -> dict[str, Any]:
    """Revisited mAP and mP@k per setting of ``(Q, D)`` queries against ``(N, D)`` database rows."""
    res = revisited_map(rank_database(queries @ database.T), bench.gnd)
    return {s: {"map": r.map, "mp": dict(zip(map(str, r.kappas), map(float, r.mp)))} for s, r in res.items()}


def run_instance(args: argparse.Namespace, bench: PhotoBenchmark,
                 whitening_images: list) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Revisited mAP of every (network, descriptor) on the photograph benchmark; also
    returns each network's R-MAC (plain and whitened) of queries + database (for the
    duplicates part)."""
    q_images, d_images = [q.image for q in bench.queries], [d.image for d in bench.database]
    rows, rmacs = {}, {}
    for net in [None] * (not args.no_baselines) + networks(args, with_alexnet=True):
        t0 = time.perf_counter()
        name = "raw pixels" if net is None else net.name
        w = None if net is None else fit_whitening(net, whitening_images)
        q, d = photo_descriptors(net, q_images, w), photo_descriptors(net, d_images, w)
        rows[name] = {feat: _scores(q[feat], d[feat], bench) for feat in q}
        rows[name]["seconds"] = time.perf_counter() - t0
        rows[name]["input_px"] = 32 if net is None else net.spec.size
        rmacs[name] = {f: np.concatenate([q[f], d[f]]) for f in ("rmac", "rmac+w") if f in q}
        print(f"instance {name:40s} " + " ".join(
            f"{f} E/M/H {r['easy']['map']:.3f}/{r['medium']['map']:.3f}/{r['hard']['map']:.3f}"
            for f, r in rows[name].items() if isinstance(r, dict)) + f" ({rows[name]['seconds']:.0f} s)", flush=True)
    info = {"counts": bench.counts(), "photos": list(dict.fromkeys(q.photo for q in bench.queries)),
            "distractor_photos": list(DISTRACTOR_PHOTOS), "seed": args.seed, "whitening_images": len(whitening_images)}
    return {**info, "rows": rows}, rmacs


# ---------------------------------------------------------------- near-duplicates

def pair_labels(bench: PhotoBenchmark) -> np.ndarray:
    """``(M, M)`` int8 over queries + database: 1 = an Easy pair (same photograph, both
    undistorted or easy, each box covering >= 60 % of the other), 0 = ignored (other
    pairs of one photograph, crops of one distractor photograph), -1 = different images."""
    items = bench.queries + bench.database
    lab = -np.ones((len(items), len(items)), np.int8)
    by_photo: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.photo is not None:
            by_photo.setdefault(it.photo, []).append(i)
    for photo, idx in by_photo.items():
        lab[np.ix_(idx, idx)] = 0
        if photo not in PHOTOS:
            continue
        for a in idx:
            for b in idx:
                if {items[a].level, items[b].level} <= {"query", "easy"} and min(
                        covered(items[a].box, items[b].box), covered(items[b].box, items[a].box)) >= 0.6:
                    lab[a, b] = 1
    np.fill_diagonal(lab, 0)
    return lab


def _pr(tp: int, fp: int, positives: int) -> dict[str, float]:
    """Precision, recall and F1 of ``tp`` right and ``fp`` wrong pairs out of ``positives``."""
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / positives if positives else float("nan")
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def duplicate_curve(vectors: np.ndarray, labels: np.ndarray, fmnist: np.ndarray,
                    thresholds=THRESHOLDS) -> list[dict[str, Any]]:
    """At each threshold ``T``, precision / recall of

    - the pairs inside :func:`near_duplicates` groups (what ``deepcluster duplicates``
      reports; every pair of a group counts: the groups are connected components), and
    - ``pairs``: the pairs with similarity ``>= T`` themselves (no transitivity).

    Ignored pairs (``labels == 0``) count neither way; ``fmnist`` ``(M,)`` marks the
    Fashion-MNIST distractors (the wrong pairs between two of them are counted apart).
    """
    n = len(vectors)
    index = build_index(vectors, [str(i) for i in range(n)], IndexMeta("bench", "rmac", vectors.shape[1]),
                        stats=(np.zeros(n, np.int64), np.zeros(n, np.int64)))
    positives = int((labels == 1).sum() // 2)
    upper = np.triu_indices(n, 1)
    sims, lab = (vectors @ vectors.T)[upper], labels[upper]
    both_fmnist = fmnist[upper[0]] & fmnist[upper[1]]
    curve = []
    for t in thresholds:
        tp = fp = 0
        for group in near_duplicates(index, float(t)):
            sub = labels[np.ix_(np.asarray(group, np.int64), np.asarray(group, np.int64))]
            tp, fp = tp + int((sub == 1).sum() // 2), fp + int((sub == -1).sum() // 2)
        hit = sims >= t
        curve.append({"threshold": float(t), **_pr(tp, fp, positives), "group_pairs": tp + fp,
                      "pairs": {**_pr(int((hit & (lab == 1)).sum()), int((hit & (lab == -1)).sum()), positives),
                                "wrong_between_fmnist": int((hit & (lab == -1) & both_fmnist).sum()),
                                "wrong": int((hit & (lab == -1)).sum())}})
    return curve


def run_duplicates(bench: PhotoBenchmark, rmacs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The curve of each network's R-MAC (plain and whitened), and its best-F1 threshold
    (on the groups, what the command reports)."""
    labels = pair_labels(bench)
    fmnist = np.array([it.level == "fmnist" for it in bench.queries + bench.database])
    out = {"easy_pairs": int((labels == 1).sum() // 2), "rows": {}}
    for name, feats in rmacs.items():
        for feat, v in feats.items():
            curve = duplicate_curve(l2n(v), labels, fmnist)
            best = max(curve, key=lambda c: (c["f1"], c["threshold"]))
            out["rows"][f"{name} {feat}"] = {"curve": curve, "best": best}
            print(f"duplicates {name + ' ' + feat:46s} best T {best['threshold']:.3f} P {best['precision']:.3f} "
                  f"R {best['recall']:.3f} F1 {best['f1']:.3f}", flush=True)
    return out


# ---------------------------------------------------------------- speed

def extraction_speed(arch: str, size: int, n: int) -> dict[str, float]:
    """Multi-scale R-MAC images/s of a random ``arch`` at ``size`` px (random inputs,
    batches of 32, through :func:`iter_features`)."""
    net = random_network(arch, size)
    conv = conv_map_fn(net.model)
    images = [torch.randn(3, size, size) for _ in range(n)]
    dataset = ImageList(images, lambda x: x)
    forward = (lambda x: multiscale(x, conv))  # noqa: E731
    with eval_mode(net.model):
        for _ in iter_features(forward, make_loader(ImageList(images[:2], lambda x: x), 2, 0)):
            pass  # warm-up
        t0 = time.perf_counter()
        for _ in iter_features(forward, make_loader(dataset, 32, 0)):
            pass
    seconds = time.perf_counter() - t0
    return {"arch": arch, "size": size, "images": n, "seconds": seconds, "images_per_s": n / seconds}


def synthetic_vectors(n: int, dim: int, centres: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, dim)`` unit vectors around ``centres`` random unit centres (noise 0.05 per coordinate)."""
    c = l2n(rng.standard_normal((centres, dim)).astype(np.float32))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        k = min(100_000, n - s)
        out[s:s + k] = l2n(c[rng.integers(centres, size=k)] + 0.05 * rng.standard_normal((k, dim)).astype(np.float32))
    return out


def index_speed(n: int, queries: int, dim: int = 256) -> dict[str, Any]:
    """Build / search times of the flat and the IVF-PQ index on ``n`` synthetic vectors,
    and IVF-PQ's recall@10 against flat's exact top 10."""
    rng = np.random.default_rng(0)
    x = synthetic_vectors(n + queries, dim, max(100, n // 500), rng)
    x, q = x[:n], x[n:]
    paths, stats = [str(i) for i in range(n)], (np.zeros(n, np.int64), np.zeros(n, np.int64))
    meta = IndexMeta("synthetic", "rmac", dim)
    out: dict[str, Any] = {"n": n, "dim": dim, "queries": queries}
    tops = {}
    for kind, limit in (("flat", n), ("ivfpq", n - 1)):
        t0 = time.perf_counter()
        index = build_index(x, paths, meta, stats, flat_limit=limit)
        t1 = time.perf_counter()
        _, tops[kind] = search(index, q, 10)
        t2 = time.perf_counter()
        assert index.kind == kind
        out[kind] = {"build_s": t1 - t0, "search_s": t2 - t1, "ms_per_query": 1000 * (t2 - t1) / queries}
        if kind == "ivfpq":
            ivf = index.index
            out[kind].update(nlist=int(ivf.nlist), m=int(ivf.pq.M), nprobe=int(ivf.nprobe))
        del index
    out["ivfpq"]["recall_at_10"] = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in
                                                  zip(tops["flat"], tops["ivfpq"])]))
    out["ivfpq"]["nn_in_top_10"] = float(np.mean([a[0] in b for a, b in zip(tops["flat"], tops["ivfpq"])]))
    print(f"index n={n}: " + ", ".join(f"{k} build {out[k]['build_s']:.1f} s search {out[k]['ms_per_query']:.2f} "
                                       "ms/query" for k in ("flat", "ivfpq"))
          + f", IVF-PQ recall@10 {out['ivfpq']['recall_at_10']:.3f}", flush=True)
    return out


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Extraction images/s and index search latency."""
    import faiss

    size = SIZES[args.mode]
    n = size["speed_images"]
    extraction = [extraction_speed("alexnet", 224, n), extraction_speed("alexnet_small", 28, 8 * n),
                  extraction_speed("alexnet_small", 96, 2 * n)]
    for e in extraction:
        print(f"speed {e['arch']} {e['size']} px: {e['images_per_s']:.1f} images/s", flush=True)
    return {"torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "extraction": extraction, "index": index_speed(args.index_n or size["index_n"], size["index_queries"])}


# ---------------------------------------------------------------- tables and main

def category_table(r: dict[str, Any]) -> str:
    """Markdown table of the category part's result."""
    lines = [f"Fashion-MNIST: {r['queries']:,} test queries, {r['database']:,} training images as the database, "
             f"relevant = same class ({r['classes']} classes).", "",
             "| features | dim | similarity | mAP@all | mAP@1000 |", "|---|---:|---|---:|---:|"]
    for name, row in r["rows"].items():
        sim = "Euclidean" if row["metric"] == "l2" else "inner product (L2-normalised)"
        lines.append(f"| {name} | {row['dim']} | {sim} | {row['map_all']:.4f} | {row['map_1000']:.4f} |")
    return "\n".join(lines)


def instance_table(r: dict[str, Any]) -> str:
    """Markdown table of the instance part's result."""
    c = r["counts"]
    lines = [f"{c['photos']} photographs, {c['queries']} queries, {c['database']:,} database images ({c['views']} views "
             f"of the photographs, the rest distractors); {c['easy_pairs']} easy, {c['hard_pairs']} hard, "
             f"{c['junk_pairs']} junk (query, view) pairs; seed {r['seed']}.", "",
             "| network | input | descriptor | Easy mAP | Medium mAP | Hard mAP | Easy mP@10 | Medium mP@10 | Hard mP@10 |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        for feat, s in row.items():
            if isinstance(s, dict):
                lines.append(f"| {name} | {row['input_px']} px | {feat} | " + " | ".join(
                    f"{s[k]['map']:.3f}" for k in ("easy", "medium", "hard")) + " | " + " | ".join(
                    f"{s[k]['mp']['10']:.3f}" for k in ("easy", "medium", "hard")) + " |")
    return "\n".join(lines)


def duplicates_table(r: dict[str, Any]) -> str:
    """Markdown tables (summary and curve) of the duplicates part's result."""
    lines = [f"{r['easy_pairs']} Easy pairs among the queries and database images.", "",
             "| R-MAC of | best-F1 T (groups) | precision | recall | F1 | T = 0.95: precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        b = row["best"]
        at = min(row["curve"], key=lambda c: abs(c["threshold"] - 0.95))
        lines.append(f"| {name} | {b['threshold']:.3f} | {b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} "
                     f"| {at['precision']:.3f} | {at['recall']:.3f} |")
    lines += ["", "Curve, precision / recall of the pairs inside the groups (and, in brackets, of the pairs "
              "with similarity >= T themselves):", "",
              "| T | " + " | ".join(r["rows"]) + " |", "|---:|" + "---:|" * len(r["rows"])]
    curves = [row["curve"] for row in r["rows"].values()]
    for i, point in enumerate(curves[0] if curves else []):
        lines.append(f"| {point['threshold']:.3f} | " + " | ".join(
            f"{c[i]['precision']:.2f} / {c[i]['recall']:.2f} ({c[i]['pairs']['precision']:.2f} / "
            f"{c[i]['pairs']['recall']:.2f})" for c in curves) + " |")
    return "\n".join(lines)


def speed_table(r: dict[str, Any]) -> str:
    """Markdown tables of the speed part's result."""
    lines = [f"torch threads {r['torch_threads']}, faiss threads {r['faiss_threads']}; random inputs, batches of 32, "
             "multi-scale R-MAC (scales 1, 0.707, 0.5) through `iter_features`.", "",
             "| network | input | images/s |", "|---|---:|---:|"]
    lines += [f"| {e['arch']} | {e['size']} px | {e['images_per_s']:.1f} |" for e in r["extraction"]]
    ix = r["index"]
    lines += ["", f"Index of {ix['n']:,} x {ix['dim']} synthetic unit vectors ({ix['queries']} queries, top 10):", "",
              "| index | build s | ms / query | recall@10 vs flat | exact 1st in top 10 |", "|---|---:|---:|---:|---:|",
              f"| flat (IndexFlatIP) | {ix['flat']['build_s']:.1f} | {ix['flat']['ms_per_query']:.2f} | 1 | 1 |",
              f"| IVF-PQ (nlist {ix['ivfpq']['nlist']}, m {ix['ivfpq']['m']}, nprobe {ix['ivfpq']['nprobe']}) "
              f"| {ix['ivfpq']['build_s']:.1f} | {ix['ivfpq']['ms_per_query']:.2f} | {ix['ivfpq']['recall_at_10']:.3f} "
              f"| {ix['ivfpq'].get('nn_in_top_10', float('nan')):.3f} |"]
    return "\n".join(lines)


TABLES = {"category": category_table, "instance": instance_table, "duplicates": duplicates_table,
          "speed": speed_table}


def replace_between(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of
    ``path`` (appended with the markers when they are missing); written atomically."""
    doc = path.read_text() if path.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in doc and end in doc:
        head, tail = doc.split(start, 1)[0], doc.split(end, 1)[1]
        doc = f"{head}{start}\n{text}\n{end}{tail}"
    else:
        doc = f"{doc.rstrip()}\n\n{start}\n{text}\n{end}\n"
    write_text(path, doc)


def write_docs(result: dict[str, Any]) -> None:
    """Each part's table, machine and command into its marked section of the docs."""
    for part, render in TABLES.items():
        if part in result:
            r = result[part]
            text = f"{render(r)}\n\n{r['machine_line']}.\nCommand: `{r['command']}`"
            replace_between(ROOT / "docs" / ("BENCHMARKS.md" if part == "speed" else "RETRIEVAL.md"),
                            f"retrieval_{part}", text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; ``--checkpoint NAME=PATH`` pairs are checked (one-line error)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="a trained network to add (run directory or .pt); repeatable")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--queries", type=int, help="Fashion-MNIST queries (default 10,000; quick 100)")
    ap.add_argument("--database", type=int, help="Fashion-MNIST database images (default 60,000; quick 500)")
    ap.add_argument("--index-n", type=int, help="vectors in the speed part's index (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the photograph benchmark")
    ap.add_argument("--no-baselines", action="store_true",
                    help="only the --checkpoint networks; their rows are added to those already in --out")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "retrieval.json")
    ap.add_argument("--docs", action="store_true", help="write the tables into docs/RETRIEVAL.md and BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    pairs = []
    for c in args.checkpoint:
        name, sep, path = c.partition("=")
        if not sep or not name or not Path(path).exists():
            ap.error(f"--checkpoint takes NAME=PATH of an existing run directory or .pt file, got {c!r}")
        pairs.append((name, path))
    args.checkpoint = pairs
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the requested parts, print their tables, write the JSON (after each part)."""
    args = parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    info = machine_info()
    stamp = {"machine": info, "machine_line": machine_line(info), "mode": args.mode,
             "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python benchmarks/retrieval.py "
             + " ".join(sys.argv[1:] if argv is None else argv)}
    todo: dict[str, Callable[[], Any]] = {"category": lambda: run_category(args), "speed": lambda: run_speed(args)}
    if {"instance", "duplicates"} & set(args.parts):
        size = SIZES[args.mode]
        cpu0, t0 = time.process_time(), time.perf_counter()
        bench = make_benchmark(args.seed, size["photos"], size["queries_per_photo"], size["views"],
                               size["photo_distractors"], size["fmnist_distractors"])
        whitening_images = [it.image for it in distractors(
            size["photo_distractors"] // 4, size["fmnist_distractors"] // 4, np.random.default_rng(args.seed + 1), 224,
            split="train")]
        instance, rmacs = run_instance(args, bench, whitening_images)
        instance.update(cpu_seconds=time.process_time() - cpu0, seconds=time.perf_counter() - t0)
        todo["instance"] = lambda: instance
        todo["duplicates"] = lambda: run_duplicates(bench, rmacs)
    for part in args.parts:
        cpu0, t0 = time.process_time(), time.perf_counter()
        got = todo[part]()
        new = {**stamp, "cpu_seconds": time.process_time() - cpu0, "seconds": time.perf_counter() - t0, **got}
        if args.no_baselines and part in result and "rows" in new:  # add the checkpoints' rows to the baselines'
            old = result[part]
            new = {**new, "rows": {**old["rows"], **new["rows"]}, "command": f"{old['command']}; then {new['command']}",
                   "cpu_seconds": old["cpu_seconds"] + new["cpu_seconds"], "seconds": old["seconds"] + new["seconds"]}
        result[part] = new
        print(TABLES[part](result[part]) + "\n", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps(result, indent=1, default=float) + "\n")
    if args.docs:
        write_docs(result)
    print(f"{machine_line(info)}; wrote {args.out}")


if __name__ == "__main__":
    main()
