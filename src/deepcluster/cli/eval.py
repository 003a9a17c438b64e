"""``deepcluster eval <protocol>``: the paper's evaluation protocols on a checkpoint (or on
raw pixels), each writing ``eval/<protocol>.json`` next to the checkpoint.

Examples::

    deepcluster eval linear   --checkpoint runs/fashion-mnist
    deepcluster eval linear   --checkpoint runs/fashion-mnist --layers conv3
    deepcluster eval mlp      --checkpoint runs/fashion-mnist
    deepcluster eval knn      --checkpoint runs/fashion-mnist
    deepcluster eval clusters --checkpoint runs/fashion-mnist
    deepcluster eval finetune --checkpoint runs/fashion-mnist --label-fraction 0.01 [--fc-only | --from-scratch]
    deepcluster eval knn      --pixels --data fashion-mnist --output-dir runs/pixels
    deepcluster eval baseline supervised --checkpoint runs/fashion-mnist --output runs/supervised
"""

from __future__ import annotations

import argparse
import logging

from . import add_epoch_flag

logger = logging.getLogger("deepcluster")

PROTOCOLS = ("linear", "mlp", "knn", "clusters", "finetune")
PIXEL_PROTOCOLS = ("linear", "knn", "clusters")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def _common(p: argparse.ArgumentParser, pixels: bool) -> None:
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", metavar="RUN_DIR_OR_FILE",
                   help="run directory (its checkpoint.pt) or a .pt file; results go to RUN_DIR/eval/")
    add_epoch_flag(g)
    if pixels:
        g.add_argument("--pixels", action="store_true",
                       help="evaluate raw pixels instead of a network (baseline; needs --data and --output-dir)")
        g.add_argument("--output-dir", help="with --pixels: where the JSON results and cached features go")
        g.add_argument("--image-size", type=int, help="with --pixels: input side (default per data set)")
    g = p.add_argument_group("data (default: the checkpoint's data set)")
    g.add_argument("--data", help="fashion-mnist, mnist, cifar10, stl10 or folder (a labelled ImageFolder tree)")
    g.add_argument("--data-root", help="folder of the data set's files")
    g.add_argument("--test-root", help="folder data only: a labelled test folder (default: a held-out 20%%)")
    g.add_argument("--subset", type=int, help="fixed random subset of the training split (quick runs)")
    g.add_argument("--test-subset", type=int, help="fixed random subset of the test split (quick runs)")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="part of the training split held out to choose hyper-parameters (default 0.1)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds subsets, validation part and training (default 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    g.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="do not cache features under eval/cache/ (recomputed every time)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is often faster on a busy machine)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (linear, mlp, knn, clusters, finetune)",
                       description="The paper's evaluation protocols. Each writes eval/<protocol>.json next to the "
                                   "checkpoint (on another data set, split or subset: eval/<protocol>--<data>-<split>"
                                   "[-sub<N>][-testsub<M>].json). See docs/EVALUATION.md.")
    ps = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    q = ps.add_parser("linear", help="linear probes on frozen conv layers (Zhang et al. protocol)")
    _common(q, pixels=True)
    q.add_argument("--layers", type=_names, help="comma-separated conv layers (default: conv1..conv5)")
    q.add_argument("--epochs", type=int, help="epochs per classifier (default 10)")
    q.add_argument("--lrs", type=_floats, help="learning rates tried on the validation part (default 0.01,0.1)")
    q.add_argument("--weight-decays", type=_floats, help="weight decays tried (default 1e-3,1e-2)")
    q.add_argument("--target-dim", type=int,
                   help="pooled dimension per layer (default 3072 below 128 px, 9216 from 128 px)")
    q.set_defaults(func=cmd_eval)

    q = ps.add_parser("mlp", help="fresh fc6-fc7-classifier on the frozen conv stack")
    _common(q, pixels=False)
    q.add_argument("--epochs", type=int, help="epochs per classifier (default 10)")
    q.add_argument("--lrs", type=_floats, help="learning rates tried on the validation part (default 0.05,0.2)")
    q.add_argument("--weight-decays", type=_floats, help="weight decays tried (default 1e-4)")
    q.set_defaults(func=cmd_eval)

    q = ps.add_parser("knn", help="cosine k-NN on the clustering features (faiss)")
    _common(q, pixels=True)
    q.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    q.add_argument("--temperature", type=float, default=0.07, help="of the weighted vote (default 0.07)")
    q.add_argument("--feature", help="default: what the run clustered (fc7, or backbone for --cluster-feature backbone); else fc7, backbone or conv1..conv5 (pooled), written to knn-<feature>.json")
    q.set_defaults(func=cmd_eval)

    q = ps.add_parser("clusters", help="k-means with k = classes on the features: NMI, ACC, ARI")
    _common(q, pixels=True)
    q.add_argument("--split", choices=["test", "train"], default="test", help="images clustered (default test)")
    q.add_argument("--n-init", type=int, default=3, help="k-means restarts, lowest loss kept (default 3)")
    q.add_argument("--repeats", type=int, default=1,
                   help="k-means draws (each of --n-init restarts, seeds SEED + r x n_init) on the chosen "
                        "preprocessing; > 1 adds nmi/acc/ari _mean and _sd (draw 0 stays the reported score)")
    q.add_argument("--feature", help="default: what the run clustered (fc7, or backbone for --cluster-feature backbone); else fc7, backbone or conv1..conv5 (pooled), written to clusters-<feature>.json")
    q.set_defaults(func=cmd_eval)

    q = ps.add_parser("finetune", help="fine-tune on a class-balanced fraction of the labels")
    _common(q, pixels=False)
    q.add_argument("--label-fraction", type=float, required=True, help="part of the labels used, e.g. 0.01 or 0.1")
    m = q.add_mutually_exclusive_group()
    m.add_argument("--fc-only", action="store_true", help="train fc6, fc7 and the classifier only (paper's fc6-8)")
    m.add_argument("--from-scratch", action="store_true", help="same training from random weights (baseline)")
    q.add_argument("--steps", type=int, default=500, help="SGD steps (default 500)")
    q.add_argument("--train-batch-size", type=int, default=64, help="fine-tuning batch size (default 64)")
    q.add_argument("--lr", type=float, default=0.01, help="initial learning rate, cosine decay (default 0.01)")
    q.add_argument("--weight-decay", type=float, default=5e-4, help="(default 5e-4)")
    q.set_defaults(func=cmd_eval)

    q = ps.add_parser("baseline", help="write the random-init or supervised baseline checkpoint of a run")
    q.add_argument("kind", choices=["random", "supervised"])
    q.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE", help="the DeepCluster run")
    q.add_argument("--output", required=True, help="directory (checkpoint.pt inside) or .pt file to write")
    q.add_argument("--epochs", type=int, help="supervised: epochs (default: the run's)")
    q.add_argument("--subset", type=int, help="supervised: train on a fixed random subset (quick runs)")
    q.add_argument("--data-root", help="supervised: replaces the run's data root")
    q.add_argument("--device", default="cpu")
    q.add_argument("--workers", type=int, default=2)
    q.set_defaults(func=cmd_baseline)


def _context(args: argparse.Namespace):
    import torch

    from ..eval import open_checkpoint, open_pixels

    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(protocol=args.protocol, data_root=args.data_root, test_root=args.test_root, subset=args.subset,
                  test_subset=args.test_subset, val_fraction=args.val_fraction, seed=args.seed,
                  batch_size=args.batch_size, workers=args.workers, cache=args.cache,
                  target_dim=getattr(args, "target_dim", None))
    if getattr(args, "pixels", False):
        if not args.data or not args.output_dir:
            raise ValueError("--pixels needs --data NAME and --output-dir DIR (where the results go)")
        return open_pixels(args.data, args.output_dir, image_size=args.image_size, **common)
    if not args.checkpoint:
        hint = " or --pixels" if args.protocol in PIXEL_PROTOCOLS else ""
        raise ValueError(f"eval {args.protocol} needs --checkpoint RUN_DIR_OR_FILE{hint}")
    from ..rundir import checkpoint_path

    return open_checkpoint(checkpoint_path(args.checkpoint, args.epoch), data=args.data, device=args.device,
                           **common)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import Grid, LINEAR_GRID, MLP_GRID, clusters_eval, finetune_eval, knn_eval, linear_eval, mlp_eval

    p = args.protocol
    if p == "finetune" and not 0 < args.label_fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    ctx = _context(args)
    if p == "linear":
        g = LINEAR_GRID
        grid = Grid(args.lrs or g.lrs, args.weight_decays or g.weight_decays, args.epochs or g.epochs, g.batch_size)
        out = linear_eval(ctx, args.layers, grid)
    elif p == "mlp":
        g = MLP_GRID
        grid = Grid(args.lrs or g.lrs, args.weight_decays or g.weight_decays, args.epochs or g.epochs, g.batch_size)
        out = mlp_eval(ctx, grid)
    elif p == "knn":
        out = knn_eval(ctx, k=args.k, temperature=args.temperature, feature=args.feature)
    elif p == "clusters":
        out = clusters_eval(ctx, split=args.split, n_init=args.n_init, feature=args.feature, repeats=args.repeats)
    else:
        mode = "fc" if args.fc_only else "scratch" if args.from_scratch else "all"
        out = finetune_eval(ctx, args.label_fraction, mode, steps=args.steps, batch_size=args.train_batch_size,
                            lr=args.lr, weight_decay=args.weight_decay)
    for name, value in out["metrics"].items():
        print(f"{name}\t{value:.4f}")
    logger.info("%s done in %.0f s; results in %s", p, out["seconds"], ctx.results_dir)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from ..eval import make_random_init, train_supervised

    if args.kind == "random":
        path = make_random_init(args.checkpoint, args.output)
    else:
        path = train_supervised(args.checkpoint, args.output, epochs=args.epochs, subset=args.subset,
                                device=args.device, workers=args.workers, data_root=args.data_root)
    print(path)
    return 0
