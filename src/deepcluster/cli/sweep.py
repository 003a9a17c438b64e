"""``deepcluster sweep --k 30,100,300 --output-dir SWEEP_DIR [train flags]``: one training
run per number of clusters k, each evaluated, in one table and one figure (the paper's
Figure 3). Every ``deepcluster train`` flag applies to every member; see docs/SWEEP.md.

Examples::

    deepcluster sweep --k 30,100,300,1000 --epochs 10 --output-dir sweeps/fmnist
    deepcluster sweep --k 10,30,100,300 --epochs 6 --subset 5000 --preset small-images --output-dir sweeps/5k
"""

from __future__ import annotations

import argparse
import logging

from .train import TRAIN_FLAGS, ConfigDefaultsFormatter, add_train_flags, flags_to_overrides

logger = logging.getLogger("deepcluster")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train and evaluate one run per number of clusters k (the paper's Figure 3)",
                       description="Train DeepCluster once per value of --k, one after the other, into "
                                   "SWEEP_DIR/k<k>/; evaluate each (k-NN, k-means NMI/ACC at the number of classes, "
                                   "and the label-free signals: RankMe, stability across k-means seeds, NMI between "
                                   "the last two epochs, cluster sizes) and write SWEEP_DIR/sweep.json, sweep.md "
                                   "and sweep.png. Running it again trains nothing that has finished and resumes "
                                   "what has not. Every train flag applies to every run (defaults shown as for "
                                   "train).",
                       formatter_class=ConfigDefaultsFormatter, conflict_handler="resolve")
    add_train_flags(p)
    # The sweep's own meanings of three train flags (re-declared: argparse's "resolve").
    p.add_argument("--k", dest="ks", required=True, metavar="K1,K2,...",
                   help="comma-separated numbers of clusters, e.g. 30,100,300,1000 (each >= 1 and at most the "
                        "number of images)")
    p.add_argument("--output-dir", dest="sweep_dir", required=True, metavar="SWEEP_DIR",
                   help="the sweep folder: one run folder k<k>/ per value, and sweep.json, sweep.md, sweep.png")
    p.add_argument("--resume", dest="resume_flag", action="store_true",
                   help="implied: a sweep always resumes its unfinished runs and skips its finished ones")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-subset", type=int, help="fixed random subset of the training split as the k-NN reference "
                   "set (default: all of it)")
    g.add_argument("--eval-test-subset", type=int, help="fixed random subset of the test split scored by k-NN and "
                   "k-means (default: all of it)")
    g.add_argument("--track", action="store_true", help="also score every snapshot the runs keep (train them with "
                   "--keep-every 1) and write SWEEP_DIR/sweep-epochs.md/.json: the Spearman rank correlation of each "
                   "label-free signal with each labelled score, over all (k, epoch) points, across k and within "
                   "each run (docs/SWEEP.md)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import parse_ks, run_sweep, table_markdown

    ks = parse_ks(args.ks)
    overrides = flags_to_overrides(args, TRAIN_FLAGS)
    try:
        rows = run_sweep(overrides, ks, args.epochs, args.sweep_dir, preset=args.preset, config_file=args.config,
                         eval_subset=args.eval_subset, eval_test_subset=args.eval_test_subset, track=args.track)
    except KeyboardInterrupt as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else 2
        raise KeyboardInterrupt(code, f"interrupted; finished runs are kept and the unfinished one keeps its last "
                                      f"complete epoch — run the same `deepcluster sweep ... --output-dir "
                                      f"{args.sweep_dir}` again to continue") from None
    print(table_markdown(rows), end="")
    logger.info("done: %s (sweep.json, sweep.md, sweep.png%s)", args.sweep_dir,
                ", sweep-epochs.json, sweep-epochs.md" if args.track else "")
    return 0
