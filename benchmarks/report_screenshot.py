"""Build a run's report, time it, and render it to a PNG with headless Chromium.

The README's screenshot of the report of the 10-epoch Fashion-MNIST run is made with

    python benchmarks/report_screenshot.py runs/fashion-mnist docs/report.png

which (re)builds ``RUN_DIR/report/index.html`` with the default options, prints how long
that took (target: under 2 minutes on 2 cores for 60,000 images) and the CPU time
used, appends the measurement to ``docs/benchmarks/report_time.json``, and writes a
1280 x 4000 px screenshot of the page. ``--no-build`` renders an existing report;
``--quick`` builds a smaller report (1,000-image sample, 20 synthesis steps) for a
try-out. Needs Debian's ``chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

from deepcluster.report import ReportOptions, build_report, find_chromium, render_screenshot  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a deepcluster train output directory")
    p.add_argument("png", help="where to write the screenshot")
    p.add_argument("--no-build", action="store_true", help="render RUN_DIR/report/index.html as it is")
    p.add_argument("--quick", action="store_true", help="a smaller report, for a try-out")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--record", default=str(DOCS / "benchmarks" / "report_time.json"),
                   help="JSON file the timing is appended to ('' = do not record)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if find_chromium() is None:
        print("chromium is not installed: apt-get install chromium", file=sys.stderr)
        return 1
    index = Path(args.run_dir) / "report" / "index.html"
    if not args.no_build:
        opt = ReportOptions(sample=1000, synth_steps=20) if args.quick else ReportOptions()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        index = build_report(args.run_dir, options=opt)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        info = machine_info()
        print(f"report built in {wall:.1f}s wall, {cpu:.1f}s CPU ({machine_line(info)})")
        if args.record and not args.quick:
            rec = Path(args.record)
            rec.parent.mkdir(parents=True, exist_ok=True)
            history = json.loads(rec.read_text()) if rec.is_file() else []
            history.append({"run_dir": str(Path(args.run_dir).resolve()), "wall_s": round(wall, 1),
                            "cpu_s": round(cpu, 1), "machine": info})
            rec.write_text(json.dumps(history, indent=1) + "\n")
    elif not index.is_file():
        print(f"{index} does not exist; run without --no-build", file=sys.stderr)
        return 1
    print(render_screenshot(index, args.png, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
