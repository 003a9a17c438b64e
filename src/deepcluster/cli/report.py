"""``deepcluster report RUN_DIR``: the static HTML report of a run (``RUN_DIR/report/index.html``)."""

from __future__ import annotations

import argparse
import logging

from . import add_run_command

logger = logging.getLogger("deepcluster")


class _Defaults:
    """``ReportOptions()``'s defaults, repeated so that building the parser stays cheap
    (importing the report pulls in torch and matplotlib); a test keeps them equal."""

    layer, sample, num_filters, synth_steps, queries = "conv5", 5000, 8, 200, 6
    largest, smallest, random_clusters, seed = 3, 3, 3, 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = _Defaults
    p = add_run_command(sub, "report", "write the HTML report of a run",
                        "Write RUN_DIR/report/index.html: training curves, cluster sizes, filters, "
                       "top-activating images, synthesised filters, nearest neighbours and cluster contact "
                       "sheets, as PNG files beside a static page that opens from disk.")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--layer", default=d.layer, help=f"conv layer for top images and synthesis (default {d.layer})")
    p.add_argument("--sample", type=int, default=d.sample,
                   help=f"random images used for top images and neighbours (default {d.sample}; more is slower)")
    p.add_argument("--num-filters", type=int, default=d.num_filters, help=f"filters shown (default {d.num_filters})")
    p.add_argument("--synth-steps", type=int, default=d.synth_steps,
                   help=f"gradient-ascent steps per synthesised image (default {d.synth_steps})")
    p.add_argument("--queries", type=int, default=d.queries, help=f"nearest-neighbour queries (default {d.queries})")
    p.add_argument("--clusters", type=int, nargs=3, metavar=("LARGEST", "SMALLEST", "RANDOM"),
                   default=[d.largest, d.smallest, d.random_clusters],
                   help="how many of the largest, smallest and random clusters get a contact sheet (default 3 3 3)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random choices")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--screenshot", metavar="PNG", help="also render the page to PNG with headless Chromium")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import ReportOptions, build_report, render_screenshot

    for name in ("sample", "num_filters", "queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.synth_steps < 0 or min(args.clusters) < 0:
        raise ValueError("--synth-steps and --clusters must be >= 0")
    opt = ReportOptions(layer=args.layer, sample=args.sample, num_filters=args.num_filters,
                        synth_steps=args.synth_steps, queries=args.queries, largest=args.clusters[0],
                        smallest=args.clusters[1], random_clusters=args.clusters[2], seed=args.seed)
    index = build_report(args.run_dir, args.out, opt, device=args.device, epoch=args.epoch)
    print(index)
    if args.screenshot:
        print(render_screenshot(index, args.screenshot))
    return 0
