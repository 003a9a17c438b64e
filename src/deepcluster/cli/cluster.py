"""``deepcluster cluster RUN --k K``: a run's images in ``K`` groups, one CSV row per image.

Examples::

    deepcluster cluster runs/fashion-mnist --k 10
    deepcluster cluster runs/fashion-mnist --k 10 --method leiden -o groups.csv
    deepcluster cluster runs/fashion-mnist --k 10 --method merge      # the run's own clusters, merged
    deepcluster cluster runs/fashion-mnist --k 10 --method scan-net --split test --save-network runs/fm-scan10

The features are the ones ``deepcluster eval clusters`` clusters (the run's clustering
feature of its data set's images, cached under ``RUN/eval/cache``); the methods are those
of :mod:`deepcluster.clustering.final` (see docs/CLUSTERS.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

from . import add_run_command

logger = logging.getLogger("deepcluster")

METHODS_HELP = ("kmeans (default), spectral, leiden, umap-gmm, umap-kmeans, merge, scan (on the frozen features) "
                "or scan-net (SCAN fine-tuning the network on the images grouped)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_run_command(sub, "cluster", "group a run's images into K clusters (the final clustering stage)",
                        "Cluster the images of a run's data set into K groups with a final clustering "
                                   "method and write one CSV row per image: index, image, cluster, confidence, "
                                   "distance. See docs/CLUSTERS.md.",
                        dest="run", metavar="RUN_DIR_OR_FILE", what="run directory (its checkpoint.pt) or a .pt file")
    p.add_argument("--k", type=int, required=True, help="number of groups K")
    p.add_argument("--method", default="kmeans", help=METHODS_HELP)
    p.add_argument("--output", "-o", help="CSV file (default: RUN/eval/final-<method>-k<K>-<split>.csv)")
    p.add_argument("--split", choices=["train", "test"], default="train",
                   help="images grouped: the data set's training split (default; for a folder, the 80%% "
                        "that `eval` does not hold out as its test part) or its test split")
    p.add_argument("--feature", help="default: what the run clustered (fc7, backbone or projection)")
    p.add_argument("--seed", type=int, default=0, help="the method's seed (default 0)")
    p.add_argument("--data-root", help="folder of the data set's files (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (feature extraction)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="do not cache features under eval/cache/")
    g = p.add_argument_group("scan-net (SCAN through the network; docs/CLUSTERS.md)")
    g.add_argument("--epochs", type=int, default=None, help="SCAN-step epochs (default 16)")
    g.add_argument("--selflabel-epochs", type=int, default=None,
                   help="self-labelling epochs (default 4; 0 skips it)")
    g.add_argument("--save-network", metavar="DIR_OR_PT",
                   help="write the fine-tuned network (head at K) as a checkpoint that every `eval` reads")
    p.set_defaults(func=cmd_cluster)


def _fine_assignments(ctx, n: int, split: str):
    """The run's last training-time assignments, when they are of the ``n`` images grouped."""
    import numpy as np

    hist = (ctx.state or {}).get("assignments")
    from ..checkpoint import saved_config

    subset = saved_config(ctx.state).data.subset if ctx.state else None
    if hist is None or len(hist) == 0:
        raise ValueError("--method merge needs the run's training clusters, and this checkpoint has none")
    last = np.asarray(hist[-1]).astype(np.int64)
    if split != "train" or subset is not None or len(last) != n:
        raise ValueError(f"--method merge needs the images the run clustered: --split train on a run trained on "
                         f"the whole training split (the run clustered {len(last)} images, here {n})")
    return last


def _scan_net(args: argparse.Namespace, ctx, source, x):
    """``--method scan-net``: fine-tune a copy of the run's network on the images grouped."""
    import torch

    from ..checkpoint import save_checkpoint, saved_config
    from ..data import train_transform_from
    from ..eval.baselines import checkpoint_target, derived_state
    from ..machine import machine_record
    from ..runtime import resolve_amp
    from ..scan_net import scan_network

    cfg = saved_config(ctx.state, str(args.run))
    out = checkpoint_target(args.save_network) if args.save_network else None  # an unwritable target fails before the work
    amp = resolve_amp(cfg.run.amp, torch.device(args.device))
    amp = amp if amp in ("none", "bf16") else "none"
    opts = {n: getattr(args, n) for n in ("epochs", "selflabel_epochs") if getattr(args, n) is not None}
    res, net = scan_network(ctx.model, source, x, args.k, spec=ctx.data.spec,
                            weak=train_transform_from(ctx.data.spec, cfg.augment), seed=args.seed,
                            device=args.device, amp=amp, channels_last=cfg.run.channels_last,
                            workers=args.workers, **opts)
    if out is not None:
        save_checkpoint(derived_state(ctx.state, net, "scan-net", int(ctx.state.get("epoch", 0)), {
            "source_checkpoint": str(args.run), "train_seconds": res.seconds, "scan_net": {
                "k": args.k, "seed": args.seed, "split": args.split, "images": len(source), "amp": amp,
                **{k: v for k, v in res.info.items() if k != "scan_losses"}},
            "machine": machine_record()}), out)
        logger.info("scan-net: fine-tuned network written to %s", out)
    return res


def _csv_text(images: list[str], res) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["index", "image", "cluster", "confidence", "distance"])
    for i, (image, c, conf, dist) in enumerate(zip(images, res.assignments, res.confidence, res.distance)):
        w.writerow([i, image, int(c), f"{float(conf):.6g}", f"{float(dist):.6g}"])
    return out.getvalue()


def cmd_cluster(args: argparse.Namespace) -> int:
    import numpy as np

    from ..clustering import final_clustering
    from ..eval import open_checkpoint
    from ..eval.clusters import cluster_scores
    from ..eval.context import results_dir_for
    from ..io import write_text
    from ..rundir import checkpoint_path

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    # The evaluation seed stays 0 whatever --seed says: the cached features are then those of `eval clusters`.
    ctx = open_checkpoint(checkpoint_path(args.run, args.epoch), protocol="cluster", data_root=args.data_root, device=args.device,
                          batch_size=args.batch_size, workers=args.workers, cache=args.cache)
    feature = ctx.encoder.feature(args.feature)
    x = np.asarray(ctx.store.get(args.split, [feature])[feature], dtype=np.float32)
    source = ctx.data.source(args.split)
    if args.method == "scan-net":
        res = _scan_net(args, ctx, source, x)
    else:
        for flag in ("epochs", "selflabel_epochs", "save_network"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is an option of --method scan-net only")
        opts = {"fine_assignments": _fine_assignments(ctx, len(x), args.split)} if args.method == "merge" else {}
        res = final_clustering(x, args.k, args.method, seed=args.seed, **opts)
    out = Path(args.output) if args.output else \
        results_dir_for(args.run) / f"final-{args.method}-k{args.k}-{args.split}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, _csv_text([source.describe(i) for i in range(len(source))], res))
    truth = ctx.data.train_labels if args.split == "train" else ctx.data.test_labels
    s = cluster_scores(res.assignments, truth)
    logger.info("%s k=%d on %d %s images (%s) in %.1f s: sizes %d-%d; vs labels NMI %.4f ACC %.4f", args.method,
                args.k, len(x), args.split, feature, res.seconds, res.sizes.min(), res.sizes.max(), s["nmi"], s["acc"])
    print(out)
    return 0
