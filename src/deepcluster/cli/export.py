"""``deepcluster export RUN_DIR``: every training image's cluster (and features) as a table."""

from __future__ import annotations

import argparse

from . import add_run_command


# The choices of deepcluster.export, repeated here so that building the parser does not
# import torch; tests/test_export_assign.py checks that the two agree.
FORMATS = ("csv", "parquet", "npy")
FEATURE_KINDS = ("pca", "fc7")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_run_command(sub, "export", "write every image's cluster (CSV, Parquet or .npy)",
                        "Write one row per training image: its index in the data set, path (folders), "
                       "label (labelled data sets) and cluster at the last epoch; with --features also the "
                       "squared distance to its centroid and the feature vector.")
    p.add_argument("--format", choices=FORMATS, default="csv", help="csv (default), parquet (needs pyarrow) or npy "
                   "(a structured array: np.load(FILE)['cluster'])")
    p.add_argument("--output", "-o", help="output file (default RUN_DIR/clusters.FORMAT; '-' = CSV on stdout)")
    p.add_argument("--features", nargs="?", const="pca", choices=FEATURE_KINDS,
                   help="also write each image's feature vector and squared distance to its centroid: "
                   "pca (default; the space of the centroids) or fc7 (the network features before PCA: the "
                   "conv stack's output for a --cluster-feature backbone run, the projection for a projection run)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes for the feature pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_run

    res = export_run(args.run_dir, args.output, args.format, args.features, args.batch_size, args.workers,
                     args.device, epoch=args.epoch)
    if res.path is not None:
        print(res.path)
    return 0
