"""``deepcluster assign --checkpoint RUN_DIR --images DIR``: new images -> learned clusters."""

from __future__ import annotations

import argparse

from . import add_epoch_flag
from .export import FEATURE_KINDS, FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assign", help="assign new images to a run's clusters",
                       description="Assign every image under --images to the nearest cluster centroid of the "
                       "checkpoint, in the same space as training (clustering transform, the clustered features, the "
                       "checkpoint's PCA-whitening). Unreadable files are listed with cluster -1 and an error.")
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    add_epoch_flag(p)
    p.add_argument("--images", required=True, help="a folder of images (searched recursively) or one image")
    p.add_argument("--format", choices=FORMATS, default="csv", help="csv (default), parquet or npy")
    p.add_argument("--output", "-o", help="output file (default: CSV on stdout)")
    p.add_argument("--features", nargs="?", const="pca", choices=FEATURE_KINDS,
                   help="also write each image's features: pca (default) or fc7 (before PCA; the conv "
                   "stack's output for a --cluster-feature backbone run, the projection for a projection run)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_assign)


def cmd_assign(args: argparse.Namespace) -> int:
    from ..export import assign_images, check_output, write_table

    out = None if args.output in (None, "-") else check_output(args.output, args.format)
    if out is None and args.format != "csv":
        raise ValueError(f"--format {args.format} needs --output FILE")
    from ..rundir import checkpoint_path

    res = assign_images(checkpoint_path(args.checkpoint, args.epoch), args.images, args.features, args.batch_size, args.device)
    write_table(res.columns(), out, args.format)
    if out is not None:
        print(out)
    return 0
