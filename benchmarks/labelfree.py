"""Do the label-free signals track labelled quality? (docs/QUALITY_SIGNAL.md, issue 24)

Networks of visibly different quality, all ``alexnet_small`` on Fashion-MNIST:

- ``random``: freshly initialised (seed 0), never trained;
- ``e1``, ``e2``, ``e4``: DeepCluster runs of 1, 2 and 4 epochs (``small-images`` preset,
  a fixed subset of 2,000 training images, batches of 64, one run each,
  ``deepcluster.train.train``);
- ``lr<X>``: the same 2,000 images trained for 2 epochs at a learning rate of ``X``
  (default 1.0; the preset's is 0.05), a deliberately degraded network.

Each network, in eval mode, gives fc7 features (``forward_features``) of 2,000 fixed
images of the training split (seed 123; the *signal set*) and of 1,000 other ones (the
*held-out* part). On the signal set, without labels:

- ``rankme``: RankMe of the fc7 features (un-augmented ``cluster_transform``);
- ``knn_agree``: kNN agreement (k = 10, cosine) between the fc7 features of two random
  augmentations (``train_transform_from`` with the preset's augmentation), the same two
  draws for every network;
- ``stab_k100`` / ``stab_k10``: cluster stability (mean pairwise NMI of k-means with
  seeds 0, 1, 2) at the runs' k = 100 and at k = 10, on the PCA-whitened (256-d),
  L2-normalised features, as the training clusters them.

With labels (the references): ``knn_acc``, a plain 20-NN cosine majority vote of the
held-out 1,000 from the signal set's 2,000 (fc7); ``nmi_k10``, NMI between k-means
(k = 10, PCA-whitened features, mean over seeds 0, 1, 2) and the labels.

Prints a markdown table per network and the Spearman rank correlation of each signal
with each reference across the networks.

    OMP_NUM_THREADS=2 python benchmarks/labelfree.py                 # 13 min on 2 busy cores (10 training)
    OMP_NUM_THREADS=2 python benchmarks/labelfree.py --epochs 1 --degraded-lr 0   # quick look
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepcluster.checkpoint import load_model
from deepcluster.clustering import PCAWhitening, kmeans
from deepcluster.config import resolve
from deepcluster.data import build_source, cluster_transform, image_spec, train_transform_from
from deepcluster.eval.knn import knn_classify
from deepcluster.labelfree import cluster_stability, knn_agreement, rankme
from deepcluster.metrics import nmi
from deepcluster.models import create_model
from deepcluster.train import TrainingError, train

SIGNALS = ("rankme", "knn_agree", "stab_k100", "stab_k10")
REFERENCES = ("knn_acc", "nmi_k10")
BATCH = 64


def run_config(out: Path, epochs: int, lr: float | None = None):
    """The ``small-images`` preset on a fixed 2,000-image subset for ``epochs`` epochs, in
    batches of 64 (31 steps an epoch; the default 256 gives 8, too few to change much)."""
    optim = {"epochs": epochs, "batch_size": BATCH} if lr is None else {"epochs": epochs, "batch_size": BATCH, "lr": lr}
    return resolve(preset="small-images", overrides={"data": {"subset": 2000}, "optim": optim,
                                                     "run": {"workers": 0, "output_dir": str(out)}})


def train_networks(workdir: Path, epochs: list[int], degraded_lr: float) -> dict[str, torch.nn.Module]:
    """``{name: model in eval mode}``: the random network and the trained ones."""
    torch.manual_seed(0)
    nets = {"random": create_model("alexnet_small", sobel=True, num_clusters=100, image_size=28, dropout=0.0).eval()}
    runs = [(f"e{e}", e, None) for e in epochs] + ([(f"lr{degraded_lr:g}", 2, degraded_lr)] if degraded_lr else [])
    for name, e, lr in runs:
        t = time.perf_counter()
        if (workdir / name / "checkpoint.pt").exists():  # a --workdir of an earlier call: reused
            nets[name] = load_model(workdir / name)[0]
            continue
        try:
            train(run_config(workdir / name, e, lr))
        except TrainingError as err:  # a diverged degraded run: reported, not fatal
            print(f"# {name}: training failed ({type(err).__name__}: {str(err).splitlines()[0]})")
            continue
        nets[name] = load_model(workdir / name)[0]
        print(f"# trained {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return nets


def image_tensors(source, indices: np.ndarray, transform, seed: int) -> torch.Tensor:
    """``(len(indices), C, H, W)``: ``transform`` of each image, torch RNG seeded once."""
    torch.manual_seed(seed)
    return torch.stack([transform(source.load(int(i))) for i in indices])


@torch.no_grad()
def fc7(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """``(N, fc_dim)`` float32 clustering features of ``images`` (eval mode)."""
    model.eval()
    return torch.cat([model.forward_features(images[s:s + batch]).float() for s in range(0, len(images), batch)]).numpy()


def measure(model: torch.nn.Module, views: dict[str, torch.Tensor], labels: np.ndarray, held_labels: np.ndarray) -> dict:
    """The signals and the references of one network (see the module docstring)."""
    f, held = fc7(model, views["clean"]), fc7(model, views["held"])
    if not (np.isfinite(f).all() and np.isfinite(held).all()):
        return {name: float("nan") for name in SIGNALS + REFERENCES}
    xp = PCAWhitening(256).fit_transform(f)
    plain, _ = knn_classify(f, labels, held, k=20, num_classes=10)
    return {
        "rankme": rankme(f),
        "knn_agree": knn_agreement(fc7(model, views["a"]), fc7(model, views["b"]), k=10),
        "stab_k100": cluster_stability(xp, 100),
        "stab_k10": cluster_stability(xp, 10),
        "knn_acc": float((plain == held_labels).mean()),
        "nmi_k10": float(np.mean([nmi(kmeans(xp, 10, seed=s).assignments, labels) for s in (0, 1, 2)])),
    }


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``; average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4], help="trained networks (epochs)")
    p.add_argument("--degraded-lr", type=float, default=1.0, help="lr of the degraded network (0: none)")
    p.add_argument("--workdir", default=None,
                   help="run folders, kept and reused by a later call (default: a temporary folder in /tmp)")
    args = p.parse_args()
    t0 = time.perf_counter()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="labelfree-", dir="/tmp") as tmp:
        nets = train_networks(Path(args.workdir or tmp), args.epochs, args.degraded_lr)
    source = build_source("fashion-mnist", split="train")
    pick = np.random.default_rng(123).choice(len(source), 3000, replace=False)
    sig, held = pick[:2000], pick[2000:]
    spec = image_spec("fashion-mnist")
    aug = train_transform_from(spec, run_config(Path("/tmp"), 1).to_dict()["optim"])
    views = {"clean": image_tensors(source, sig, cluster_transform(spec), 0),
             "held": image_tensors(source, held, cluster_transform(spec), 0),
             "a": image_tensors(source, sig, aug, 1), "b": image_tensors(source, sig, aug, 2)}
    rows = {name: measure(m, views, source.labels[sig], source.labels[held]) for name, m in nets.items()}
    cols = SIGNALS + REFERENCES
    print("\n| network | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    ok = [n for n, r in rows.items() if all(np.isfinite(r[c]) for c in cols)]
    print(f"\nSpearman rank correlation over {len(ok)} networks ({', '.join(ok)}):\n")
    print("| signal | " + " | ".join(REFERENCES) + " |\n|---|" + "---|" * len(REFERENCES))
    for s in SIGNALS:
        print(f"| {s} | " + " | ".join(f"{spearman([rows[n][s] for n in ok], [rows[n][r] for n in ok]):+.2f}"
                                       for r in REFERENCES) + " |")
    print(f"\n# {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
