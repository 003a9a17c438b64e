"""``deepcluster viz <figure> RUN``: one figure of the report as PNG files.

Figures: ``curves``, ``filters``, ``top-images``, ``synthesize``, ``neighbors``,
``clusters``. Each writes into ``--out`` (default ``RUN_DIR/viz``) and prints the paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,17, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz", help="draw one figure of the report (PNG files)",
                       description="Draw one of the report's figures for a run and write PNG files.")
    figs = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")

    def common(q: argparse.ArgumentParser, computes: bool = True) -> None:
        """RUN and --out; with ``computes`` (a figure with random choices or a forward
        pass) also --seed and --device."""
        q.add_argument("run", metavar="RUN", help="a run directory (or its checkpoint.pt)")
        q.add_argument("--out", help="output folder (default RUN_DIR/viz)")
        if computes:
            q.add_argument("--seed", type=int, default=0, help="seed of the random choices")
            q.add_argument("--device", default="cpu", help="cpu or cuda")

    def sampled(q: argparse.ArgumentParser) -> None:
        q.add_argument("--sample", type=int, default=5000, help="random images searched (default 5000)")

    def filter_choice(q: argparse.ArgumentParser) -> None:
        q.add_argument("--layer", default="conv5", help="conv layer (default conv5)")
        q.add_argument("--filters", type=_int_list, help="filter indices, e.g. 0,5,17 (default: a random sample)")
        q.add_argument("--num-filters", type=int, default=8, help="random filters when --filters is not given")

    def figure(name: str, text: str, func, *parts, computes: bool = True) -> argparse.ArgumentParser:
        q = figs.add_parser(name, help=text)
        common(q, computes)
        for part in parts:
            part(q)
        q.set_defaults(func=_tidy(func))
        return q

    figure("curves", "training curves and the cluster-size histogram", cmd_curves)
    # the weights as they are: nothing random, nothing computed
    figure("filters", "first-layer filters as an image grid", cmd_filters, computes=False)
    q = figure("top-images", "top-activating images of filters of a layer", cmd_top, filter_choice, sampled)
    q.add_argument("--k", type=int, default=9, help="images per filter (default 9)")
    q = figure("synthesize", "images synthesised by gradient ascent to maximise filters", cmd_synthesize, filter_choice)
    q.add_argument("--steps", type=int, default=200, help="gradient steps (default 200)")
    q.add_argument("--lr", type=float, default=0.05, help="RMS change per input value per step (default 0.05)")
    q.add_argument("--weight-decay", type=float, default=1e-4, help="weight of ||x||^2 (default 1e-4)")
    q.add_argument("--blur-every", type=int, default=4, help="blur every N steps (default 4; 0: never)")
    q.add_argument("--blur-sigma", type=float, default=0.5, help="blur standard deviation in pixels (default 0.5)")
    q = figure("neighbors", "nearest neighbours of query images, random network vs trained", cmd_neighbors, sampled)
    q.add_argument("--queries", type=int, default=6, help="query images (default 6)")
    q.add_argument("--k", type=int, default=4, help="neighbours per query and network (default 4)")
    q = figure("clusters", "contact sheets of clusters, with purity when labelled", cmd_clusters)
    q.add_argument("--clusters", type=_int_list, help="cluster ids, e.g. 3,17 (default: largest/smallest/random)")
    q.add_argument("--largest", type=int, default=3)
    q.add_argument("--smallest", type=int, default=3)
    q.add_argument("--random", type=int, default=3)
    q.add_argument("--per-cluster", type=int, default=32, help="images per sheet (default 32)")


def _target(args: argparse.Namespace) -> Path:
    run = Path(args.run)
    return Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "viz"


def _tidy(cmd):
    """``cmd`` that, when it fails, removes the output folder it created if it is still empty."""
    def run(args: argparse.Namespace) -> int:
        target = _target(args)
        existed = target.exists()
        try:
            return cmd(args)
        except BaseException:
            if not existed and target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            raise
    return run


def _out(args: argparse.Namespace) -> Path:
    from ..rundir import ensure_writable_dir

    return ensure_writable_dir(_target(args))


def _load(args: argparse.Namespace):
    from ..rundir import Run

    return Run.load(args.run, device=getattr(args, "device", "cpu"))


def _done(paths: list[Path]) -> int:
    for p in paths:
        print(p)
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    import numpy as np

    from ..viz import curves
    from ..rundir import RunDir

    run = Path(args.run)
    run_dir = run if run.is_dir() else run.parent
    records = RunDir(run_dir).read_metrics(required=True)
    out = _out(args)
    paths = []
    for name, fn in (("nmi", curves.plot_nmi), ("losses", curves.plot_losses), ("sizes", curves.plot_cluster_sizes),
                     ("timings", curves.plot_timings)):
        paths.append(out / f"{name}.png")
        curves.save_figure(fn(records), paths[-1])
    hist = RunDir(run_dir).read_assignments()
    if hist is not None and len(hist):
        paths.append(out / "size_histogram.png")
        curves.save_figure(curves.plot_size_histogram(np.bincount(hist[-1].astype(np.int64))), paths[-1])
    return _done(paths)


def cmd_filters(args: argparse.Namespace) -> int:
    from ..viz.curves import save_figure
    from ..viz.filters import filter_grid, plot_filters
    from ..viz.images import save_png, upscale_factor

    out = _out(args)
    run = _load(args)
    grid = filter_grid(run.model)
    save_png(grid, out / "filters_grid.png", scale=upscale_factor(max(grid.shape[:2])))
    save_figure(plot_filters(run.model), out / "filters.png")
    return _done([out / "filters.png", out / "filters_grid.png"])


def _filters(args: argparse.Namespace, run, scores=None) -> list[int]:
    import numpy as np

    from ..viz.activations import check_layer, pick_filters
    from ..viz.synthesis import layer_mean_activations

    check_layer(run.model, args.layer)
    if args.filters:
        return args.filters
    if scores is None:  # only the number of filters is needed: one blank image
        import torch

        with torch.no_grad():
            c = layer_mean_activations(run.model, args.layer, torch.zeros(1, 3, run.model.image_size,
                                                                          run.model.image_size)).shape[1]
        scores = np.ones((1, c))
    return pick_filters(scores, args.num_filters, args.seed)


def cmd_top(args: argparse.Namespace) -> int:
    from ..viz.images import run_display
    import numpy as np

    from ..report import ReportOptions, sample_pass
    from ..viz.activations import check_layer, plot_top_images, top_activating
    from ..viz.curves import save_figure

    out = _out(args)
    run = _load(args)
    check_layer(run.model, args.layer)
    s = sample_pass(run, ReportOptions(layer=args.layer, sample=args.sample, seed=args.seed), random_network=False)
    filters = _filters(args, run, s["scores"])
    top = top_activating(s["scores"], filters, args.k)
    disp = np.zeros((len(s["x"]),) + tuple(s["x"].shape[2:]) + (3,))
    rows = np.unique(top)
    disp[rows] = run_display(run, s["x"][rows])
    path = out / f"top_images_{args.layer}.png"
    save_figure(plot_top_images(disp, top, filters, args.layer), path)
    return _done([path])


def cmd_synthesize(args: argparse.Namespace) -> int:
    from ..models import Sobel
    from ..viz.curves import save_figure
    from ..viz.synthesis import plot_synthesis, synthesis_display, synthesize

    out = _out(args)
    run = _load(args)
    filters = _filters(args, run)
    x = synthesize(run.model, args.layer, filters, run.spec.mean, run.spec.std, steps=args.steps, lr=args.lr,
                   weight_decay=args.weight_decay, blur_every=args.blur_every, blur_sigma=args.blur_sigma,
                   seed=args.seed)
    path = out / f"synthesis_{args.layer}.png"
    save_figure(plot_synthesis(synthesis_display(x, isinstance(run.model.sobel, Sobel)), filters, args.layer), path)
    return _done([path])


def cmd_neighbors(args: argparse.Namespace) -> int:
    from ..viz.images import run_display
    import numpy as np

    from ..report import ReportOptions, sample_pass
    from ..viz.curves import save_figure
    from ..viz.neighbors import nearest_neighbors, plot_neighbors

    out = _out(args)
    run = _load(args)
    s = sample_pass(run, ReportOptions(layer=next(iter(run.model.conv_layers)), sample=args.sample, seed=args.seed))
    n = len(s["x"])
    queries = np.sort(np.random.default_rng(args.seed + 1).choice(n, min(args.queries, n), replace=False))
    k = min(args.k, n - 1)
    nn_t = nearest_neighbors(s["features"], queries, k)
    nn_r = nearest_neighbors(s["random_features"], queries, k)
    rows = np.unique(np.concatenate([queries, nn_t.ravel(), nn_r.ravel()]))
    disp = np.zeros((n,) + tuple(s["x"].shape[2:]) + (3,))
    disp[rows] = run_display(run, s["x"][rows])  # only the pictures shown
    path = out / "neighbors.png"
    save_figure(plot_neighbors(disp, queries, nn_r, nn_t, s["labels"], run.class_names), path)
    return _done([path])


def cmd_clusters(args: argparse.Namespace) -> int:
    from ..viz.images import run_display
    import numpy as np

    from ..viz.clusters import (ClusterPick, cluster_members, cluster_purity_of, cluster_title, contact_sheet,
                                pick_clusters, plot_contact_sheet)
    from ..viz.curves import save_figure

    out = _out(args)
    run = _load(args)
    last = run.last_assignments
    sizes = np.bincount(last)
    if args.clusters:
        bad = [c for c in args.clusters if c >= len(sizes) or sizes[c] == 0]
        if bad:
            raise ValueError(f"cluster(s) {bad} do not exist or are empty; ids go from 0 to {len(sizes) - 1}")
        picks = []
        for c in args.clusters:
            p = ClusterPick(c, "chosen", int(sizes[c]))
            if run.labels is not None:
                p.purity, p.majority = cluster_purity_of(last, run.labels, c)
            picks.append(p)
    else:
        picks = pick_clusters(last, args.largest, args.smallest, args.random, args.seed, run.labels)
    paths = []
    for p in picks:
        members = cluster_members(last, p.cluster, args.per_cluster, args.seed)
        sheet = contact_sheet(lambda i: run_display(run, run.load_images(np.array([i])))[0], members)
        paths.append(out / f"cluster_{p.cluster:05d}.png")
        save_figure(plot_contact_sheet(sheet, cluster_title(p, run.class_names)), paths[-1])
    return _done(paths)
