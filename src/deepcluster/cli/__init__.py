"""Command line: ``deepcluster <command>``. The only place that parses arguments.

One module per subcommand (``cli/train.py``, ``cli/eval.py``, ...), each with
``add_parser(subparsers)`` that registers its arguments and sets ``func``.
Configuration is resolved here once and passed down as typed objects.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from .. import __version__
from ..config import ConfigError

logger = logging.getLogger("deepcluster")

# Subcommand modules, in help order; a module not (yet) present is simply not offered.
COMMANDS = ["train", "sweep", "eval", "report", "viz", "export", "assign", "cluster", "search", "export_model"]


def add_epoch_flag(p: argparse.ArgumentParser) -> None:
    """``--epoch E|best``: which checkpoint of a run directory (default: the last)."""
    p.add_argument("--epoch", metavar="E|best", help="the run after E completed epochs (a checkpoint-epochE.pt kept "
                   "with train --keep-every) or 'best' (best.pt, train --eval-every); default: the last")


def add_run_command(sub: argparse._SubParsersAction, name: str, text: str, description: str,
                    dest: str = "run_dir", metavar: str = "RUN_DIR",
                    what: str = "the --output-dir of a `deepcluster train` run") -> argparse.ArgumentParser:
    """A subcommand on one run: ``NAME RUN [--epoch E|best] ...``."""
    p = sub.add_parser(name, help=text, description=description)
    p.add_argument(dest, metavar=metavar, help=what)
    add_epoch_flag(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepcluster", description="DeepCluster: unsupervised convnet features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        code = 143 if e.args and e.args[0] == 15 else 130
        if len(e.args) > 1:  # train() says what was kept and how to resume
            print(f"deepcluster: {e.args[1]}", file=sys.stderr)
            return code
        out = getattr(args, "output_dir", None)
        if args.command == "train" and out and (Path(out) / "checkpoint.pt").is_file():
            print(f"deepcluster: interrupted; the last complete epoch is saved — continue with "
                  f"`deepcluster train --output-dir {out} --resume`", file=sys.stderr)
        else:  # before the run folder held a checkpoint (start-up), or another command
            print(f"deepcluster: interrupted before anything was saved; run `deepcluster {args.command} ...` again",
                  file=sys.stderr)
        return code
    except (ValueError, RuntimeError, OSError) as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"deepcluster: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
