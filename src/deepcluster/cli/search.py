"""``deepcluster index|search|duplicates``: image search with a trained network.

    deepcluster index --checkpoint RUN --images DIR -o images.dcindex [--feature rmac|fc7]
    deepcluster search images.dcindex query1.jpg query2.jpg --top 5 [--json]
    deepcluster duplicates images.dcindex --threshold 0.95 -o duplicates.csv
"""

from __future__ import annotations

import argparse
import logging
import sys

# The choices of deepcluster.retrieval.images, repeated so that building the parser does
# not import torch; tests/test_retrieval_cli.py checks that the two agree.
FEATURES = ("rmac", "fc7")

logger = logging.getLogger("deepcluster")


def add_parser(sub: argparse._SubParsersAction) -> None:
    _add_index(sub)
    _add_search(sub)
    _add_duplicates(sub)


def _command(sub: argparse._SubParsersAction, name: str, func, summary: str, description: str,
             takes_index: bool = True) -> argparse.ArgumentParser:
    """A subcommand running ``func``; ``takes_index``: its first argument is an INDEX file."""
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(func=func)
    if takes_index:
        p.add_argument("index", metavar="INDEX", help="an index written by `deepcluster index`")
    return p


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "index", cmd_index, "index a folder of images for search (R-MAC or fc7 descriptors)",
                 "Describe every image under --images with the checkpoint's network and write a faiss index. Run "
                 "it again on the same -o to describe only new or changed files.", takes_index=False)
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory or checkpoint .pt file")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--output", "-o", required=True, metavar="INDEX", help="index file to write (or update)")
    p.add_argument("--feature", choices=FEATURES, default="rmac",
                   help="rmac (default: regional max-pooling of the last conv layer, 3 scales; best for finding "
                   "the same object or scene) or fc7 (the clustering feature; closer to 'same kind of image')")
    p.add_argument("--rebuild", action="store_true", help="describe every image again, even if INDEX is up to date")
    p.add_argument("--whiten", metavar="DIR", help="PCA-whiten R-MAC, learning the whitening on the images of DIR: "
                   "use a different set than --images, as the paper does (Paris for Oxford); kept in INDEX")
    p.add_argument("--whiten-dim", type=int, metavar="N", help="dimensions kept by the whitening (default: all, the "
                   "number of channels of the last conv layer)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "search", cmd_search, "find the indexed images most similar to query images",
                 "Describe each query with the network the index was built with and print its most similar "
                 "indexed images (cosine similarity).")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    p.add_argument("--top", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--checkpoint", metavar="RUN", help="the network (default: the one recorded in the index; "
                   "it must be the same weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _add_duplicates(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "duplicates", cmd_duplicates, "list groups of near-identical indexed images",
                 "Pairs of indexed images whose descriptors have cosine similarity >= --threshold, joined into "
                 "groups (connected components), one CSV row per image.")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity for two images to count as near-duplicates (default 0.95; lower it to "
                   "catch crops and re-encodings, raise it if distinct images get grouped)")
    p.add_argument("--output", "-o", default="-", metavar="CSV", help="CSV file (default '-': standard output)")


def cmd_index(args: argparse.Namespace) -> int:
    from ..retrieval.images import ImageDescriber, index_folder

    describer = ImageDescriber.from_checkpoint(args.checkpoint, args.feature, args.device)
    rep = index_folder(describer, args.images, args.output, args.batch_size, args.rebuild, args.whiten,
                       args.whiten_dim)
    print(f"{rep.path}: {rep.total} images ({rep.kind}, {args.feature} {describer.dim}-d); described {rep.described}, "
          f"dropped {rep.removed}, unreadable {len(rep.unreadable)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json

    from ..retrieval.images import ImageDescriber, search_files
    from ..retrieval.index import load_index

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    index = load_index(args.index)
    describer = ImageDescriber.for_index(index, args.checkpoint, args.device)
    answers = search_files(index, describer, args.queries, args.top)
    for a in answers:
        if a.error:
            print(f"deepcluster: error: cannot read query {a.query}: {a.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"query": a.query, "error": a.error or None,
                           "results": [{"path": p, "similarity": round(s, 6)} for p, s in a.results]}
                          for a in answers], indent=1))
    else:
        for a in answers:
            if not a.error:
                print(a.query)
                print("\n".join(f"  {r:3d}  {s:.4f}  {p}" for r, (p, s) in enumerate(a.results, 1)))
    return 1 if any(a.error for a in answers) else 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    import csv
    import io

    from ..io import write_text
    from ..retrieval.index import load_index, near_duplicates

    index = load_index(args.index)
    if index.meta.feature == "rmac" and not index.info.get("whitening"):
        logger.warning("%s holds R-MAC that is not whitened: similarities crowd near 1 and near-duplicates are not "
                       "separable at any threshold (measured, docs/RETRIEVAL.md); re-index with --whiten DIR "
                       "(a different set of images)", args.index)
    groups = near_duplicates(index, args.threshold)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "size", "path"])
    writer.writerows([g, len(paths), p] for g, paths in enumerate(groups) for p in paths)
    if args.output == "-":
        sys.stdout.write(buf.getvalue())
    else:
        write_text(args.output, buf.getvalue())
        print(f"{args.output}: {len(groups)} groups, {sum(map(len, groups))} images")
    return 0
