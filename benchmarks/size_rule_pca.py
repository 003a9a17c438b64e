"""How many PCA-whitened dimensions k-means can use on N images: NMI with the labels of
k-means on the fc7 features of a random ``alexnet_small`` (the network every DeepCluster
run starts from, so these are its first pseudo-labels), for several N, k and PCA widths.
The measurement behind ``deepcluster.sizing.rule_pca_dim`` (experiments/SIZES.md).

    OMP_NUM_THREADS=1 python benchmarks/size_rule_pca.py [--sizes 1000,2000,5000,10000,20000] [--digits DIR]

Prints a Markdown table and writes ``docs/benchmarks/size_rule_pca.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deepcluster.clustering import PCAWhitening, kmeans
from deepcluster.config import resolve
from deepcluster.data import IndexedDataset, cluster_transform, image_spec
from deepcluster.features import extract, make_loader
from deepcluster.io import write_text
from deepcluster.metrics import nmi
from deepcluster.session import build_model, build_training_source

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DIMS = (256, 128, 64, 32, 16)
KS = (10, 30, 100)


def random_fc7(data: dict) -> tuple[np.ndarray, np.ndarray]:
    cfg = resolve("small-images", None, {"data": data, "size": {"rule": "off"}})
    src = build_training_source(cfg)
    spec = image_spec(cfg.data.name, cfg.data.image_size)
    torch.manual_seed(0)
    model = build_model(cfg, spec.size, 100).eval()
    ds = IndexedDataset(src, cluster_transform(spec))
    x = extract(model.forward_features, make_loader(ds, 256, 0), len(ds), model.feature_dim, "cpu", "none", False)
    return x, np.asarray(src.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,2000,5000,10000,20000", help="Fashion-MNIST training subsets")
    p.add_argument("--digits", type=Path, help="the digits folder of benchmarks/sizes.py (adds its 1,797 images)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "size_rule_pca.json")
    args = p.parse_args(argv)
    from machine import machine_info, machine_line

    sets = [(f"Fashion-MNIST {int(n):,}", {"subset": int(n)}) for n in args.sizes.split(",")]
    if args.digits:
        sets.append(("digits 1,797", {"name": "folder", "root": str(args.digits), "image_size": 28}))
    rows = []
    print("| data | k | " + " | ".join(f"PCA {d}" for d in DIMS) + " |")
    print("|---|---:|" + "---:|" * len(DIMS))
    for name, data in sets:
        x, y = random_fc7(data)
        for k in KS:
            scores = {}
            for dim in DIMS:
                z = PCAWhitening(min(dim, x.shape[1]), whiten=True).fit(x).transform(x)
                scores[dim] = float(nmi(kmeans(np.ascontiguousarray(z, dtype=np.float32), k, seed=0).assignments, y))
            rows.append({"data": name, "images": len(y), "k": k, "nmi": scores})
            print(f"| {name} | {k} | " + " | ".join(f"{scores[d]:.3f}" for d in DIMS) + " |", flush=True)
    info = machine_info()
    write_text(args.out, json.dumps({"_meta": {"machine": info, "dims": DIMS}, "rows": rows}, indent=1))
    print(f"\nMachine: {machine_line(info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
