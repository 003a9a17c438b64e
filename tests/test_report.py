"""The HTML report: every figure it links exists and decodes (in headless Chromium too,
when installed), captions and tables are there, and bad input fails with one line."""

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import train_tiny
from deepcluster.cli import main
from deepcluster.report import ReportOptions, build_report, dump_dom, find_chromium, render_screenshot

FAST = ReportOptions(synth_steps=20, num_filters=4, queries=3, neighbors=3, per_cluster=16)


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(tiny_run):
    return build_report(tiny_run, options=FAST)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.captions = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "figcaption":
            self.captions += 1


def _parse(text: str) -> _Images:
    p = _Images()
    p.feed(text)
    return p


def _check_images_decode(page: Path, images: list[dict[str, str]]) -> None:
    for img in images:
        src = img["src"]
        assert "/" not in src and not src.startswith(("http", "file:")), f"{src} is not a file beside the page"
        path = page.parent / src
        assert path.is_file(), f"{src} is referenced but missing"
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 20


def test_report_links_only_existing_pngs_beside_it(report, tiny_run):
    assert report == tiny_run / "report" / "index.html"
    page = _parse(report.read_text())
    srcs = [i["src"] for i in page.images]
    for name in ("nmi.png", "losses.png", "sizes.png", "timings.png", "size_histogram.png", "filters.png",
                 "top_images.png", "synthesis.png", "neighbors.png"):
        assert name in srcs
    assert sum(s.startswith("cluster_") for s in srcs) == 9  # 3 largest, 3 smallest, 3 random
    assert page.captions == len(page.images) and all(i.get("alt") for i in page.images)
    _check_images_decode(report, page.images)
    assert sorted(p.name for p in report.parent.glob("*.png")) == sorted(srcs)


def test_report_has_the_config_and_final_metrics(report, tiny_run):
    text = report.read_text()
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{last['nmi_labels']:.3f}" in text and f"{last['convnet_loss']:.3f}" in text
    assert "<b>k</b>&nbsp;10" in text and "alexnet_small" in text  # config table: cluster.k = 10
    assert "<script" not in text  # static: no script (an image's onerror only marks it broken)


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    dom = dump_dom(report)
    page = _parse(dom)
    assert len(page.images) >= 18
    failed = [i["src"] for i in page.images if "broken" in i.get("class", "")]
    assert not failed, f"the browser could not load {failed}"
    _check_images_decode(report, page.images)
    shot = render_screenshot(report, tmp_path / "shot.png", 1000, 1400)
    with Image.open(shot) as im:
        im = im.convert("L")
        assert im.size == (1000, 1400)
        lo, hi = im.getextrema()
        assert hi - lo > 100  # not a blank page


def test_report_without_checkpoint_draws_the_curves_and_says_why(tiny_run, tmp_path):
    run = tmp_path / "curves-only"
    run.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "assignments.npy"):
        shutil.copy(tiny_run / name, run / name)
    index = build_report(run, options=FAST)
    page = _parse(index.read_text())
    assert {i["src"] for i in page.images} == {"nmi.png", "losses.png", "sizes.png", "timings.png",
                                               "size_histogram.png"}
    assert "checkpoint.pt does not exist" in index.read_text()


def test_report_bad_input(tiny_run, tmp_path, capsys):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        build_report(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        build_report(tmp_path)
    with pytest.raises(ValueError, match=r"layer 'conv7' does not exist.*conv5"):
        build_report(tiny_run, tmp_path / "r", ReportOptions(layer="conv7"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        build_report(tiny_run, blocker / "report")
    assert main(["report", str(tiny_run), "--out", str(blocker / "report")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepcluster: error: output directory") and "\n" not in err


def test_report_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", str(tiny_run), "--out", str(out), "--synth-steps", "5", "--num-filters", "2",
                 "--clusters", "1", "0", "1", "--layer", "conv3"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = _parse((out / "index.html").read_text())
    assert sum(i["src"].startswith("cluster_") for i in page.images) == 2
    _check_images_decode(out / "index.html", page.images)


def test_cli_defaults_are_the_library_defaults():
    from dataclasses import asdict

    from deepcluster.cli import report as cli_report
    from deepcluster.cli.assign import FEATURE_KINDS, FORMATS
    from deepcluster.export import FEATURE_KINDS as LIB_KINDS, FORMATS as LIB_FORMATS

    d = asdict(ReportOptions())
    for key in ("layer", "sample", "num_filters", "synth_steps", "queries", "largest", "smallest",
                "random_clusters", "seed"):
        assert getattr(cli_report._Defaults, key) == d[key], key
    assert (FORMATS, FEATURE_KINDS) == (LIB_FORMATS, LIB_KINDS)
