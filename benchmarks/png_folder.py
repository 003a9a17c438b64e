"""Write a split of Fashion-MNIST as a folder of PNG files, the layout a user's own data
has: one sub-folder per class (``0-T-shirt_top/000123.png`` ...). The class folders
give labels to the evaluations only; ``deepcluster train --data folder`` ignores them.

Usage::

    .venv/bin/python benchmarks/png_folder.py /tmp/fmnist-test-png            # the 10k test images
    .venv/bin/deepcluster train --preset small-images --data folder --data-root /tmp/fmnist-test-png \\
        --output-dir runs/fmnist-test-folder

Issue 6 measures the ``small-images`` preset, untouched, on this folder (experiments/ABLATION.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from deepcluster.data import build_source


def write_png_folder(out: Path, split: str = "test", root: str | None = None, limit: int | None = None) -> int:
    """Write ``split`` of Fashion-MNIST under ``out``; returns the number of images written."""
    src = build_source("fashion-mnist", root, split, download=False)
    n = len(src) if limit is None else min(limit, len(src))
    names = [f"{i}-{re.sub(r'[^A-Za-z0-9]+', '_', c)}" for i, c in enumerate(src.classes)]
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src.load(i).convert("L").save(out / names[int(src.labels[i])] / f"{i:06d}.png")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--data-root", help="Fashion-MNIST files (default: the Debian package's)")
    p.add_argument("--limit", type=int, help="first N images only")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; choose a new folder")
    n = write_png_folder(args.out, args.split, args.data_root, args.limit)
    print(f"wrote {n} PNG images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
