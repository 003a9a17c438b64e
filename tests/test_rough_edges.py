"""The rough edges of issue 19 (and the CLI/config items of issue 22), one regression
test each: folder names as labels or not, evaluation results keyed by data set, the
``train --help`` defaults and choices, ``--version``, small floats in the report, the
empty legend, progress lines without a terminal, the not-found/download message, the
split check, and the refused ``--image-size 0``, ``--fc-dim 0`` and ``--config DIR``."""

import argparse
import dataclasses
import json
import logging
import re
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_tiny
from deepcluster.cli import build_parser, main
from deepcluster.cli.train import TRAIN_FLAGS
from deepcluster.config import PRESETS, Config, ConfigError, DataConfig, resolve
from deepcluster.data import DATASETS, SPLITS, DataError, build_source, training_source
from deepcluster.eval.context import result_name
from deepcluster.models import list_models


def _images(folder, n, value, size=28):
    """``n`` PNG images of ``size`` px in ``folder``: grey level ``value`` plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(n):
        img = np.clip(value + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Unlabelled photos kept by month: ``photos/2019-01`` and ``photos/2019-02``."""
    root = tmp_path_factory.mktemp("rough") / "photos"
    _images(root / "2019-01", 10, 60)
    _images(root / "2019-02", 10, 190)
    return root


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("deepcluster: error:") and needle in err[0], err
    return err[0]


# 1. Folder names as labels: data.labels / --labels folders|none --------------------------

def test_labels_none_drops_the_folder_labels_and_keeps_the_images(photos):
    kept = build_source("folder", str(photos))
    assert kept.classes == ["2019-01", "2019-02"]
    assert kept.labels.tolist() == [0] * 10 + [1] * 10
    assert "folder names used as labels" in kept.label_note
    dropped = build_source("folder", str(photos), labels="none")
    assert dropped.labels is None and dropped.classes is None
    assert dropped.paths == kept.paths  # the same images, in the same order
    assert "folder names not used as labels" in dropped.label_note
    sub = training_source(DataConfig(name="folder", root=str(photos), labels="none", subset=5), seed=0)
    assert sub.labels is None and len(sub) == 5 and sub.label_note == dropped.label_note
    with pytest.raises(DataError, match="unknown labels setting 'months'"):
        build_source("folder", str(photos), labels="months")
    with pytest.raises(ConfigError, match="data.labels must be folders or none"):
        resolve(overrides={"data": {"labels": "months"}})


@pytest.mark.parametrize("labels, said, nmi_vs_labels", [
    ("folders", "folder names used as labels", True),
    ("none", "folder names not used as labels (--labels none)", False),
])
def test_the_first_log_line_says_whether_folder_names_are_labels(photos, tmp_path, caplog, monkeypatch, labels, said,
                                                                  nmi_vs_labels):
    import deepcluster.runtime

    monkeypatch.setattr(deepcluster.runtime, "PROGRESS_INTERVAL", 0.0)  # item 6: a progress line every step
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--data", "folder", "--data-root", str(photos), "--labels", labels, "--k", "2",
                     "--pca-dim", "4", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                     "--output-dir", str(out)]) == 0
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("DeepCluster "))
    assert said in first, first
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (record.get("nmi_labels") is not None) == nmi_vs_labels
    assert yaml_labels(out) == labels
    # Item 6 on the real loops: the extraction (20 images, batch 8: 3 steps) and the
    # training pass report their steps when stderr is not a terminal (it is not here).
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"\S.*: 3/3 steps, 20 images, [\d.]+ images/s", m) for m in lines), lines
    assert any(re.match(r"train 0: 1/\d+ steps, \d+ images", m) for m in lines), lines


def yaml_labels(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["labels"]


# 2. Evaluation results keyed by data set, split and subset --------------------------------

def test_result_names():
    assert result_name("linear", "fashion-mnist") == "linear"
    assert result_name("linear", "cifar10", own=False) == "linear--cifar10-test"
    assert result_name("linear", "cifar10", own=False, subset=500) == "linear--cifar10-test-sub500"
    assert result_name("knn", "fashion-mnist", test_subset=30) == "knn--fashion-mnist-test-testsub30"
    assert result_name("clusters", "mnist", split="train") == "clusters--mnist-train"
    assert result_name("knn", "folder", "/data/my photos/", own=False) == "knn--folder-my_photos-test"
    assert result_name("knn", "folder", "/data/a", test_root="/data/b") == "knn--folder-a-test-b"


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("rough-eval") / "run", optim={"epochs": 1})


def test_eval_on_another_data_set_writes_its_own_file(tiny_run, tmp_path):
    labelled = tmp_path / "shapes"
    _images(labelled / "dark", 15, 40)
    _images(labelled / "light", 15, 210)
    fast = ["--layers", "conv1", "--epochs", "1", "--lrs", "0.1", "--weight-decays", "0", "--workers", "0"]
    assert main(["eval", "linear", "--checkpoint", str(tiny_run), *fast]) == 0
    assert main(["eval", "linear", "--checkpoint", str(tiny_run), "--data", "folder", "--data-root", str(labelled),
                 *fast]) == 0
    assert main(["eval", "linear", "--checkpoint", str(tiny_run), "--test-subset", "30", *fast]) == 0
    ev = tiny_run / "eval"
    own = json.loads((ev / "linear.json").read_text())
    other = json.loads((ev / "linear--folder-shapes-test.json").read_text())
    sub = json.loads((ev / "linear--fashion-mnist-test-testsub30.json").read_text())
    assert own["data"]["name"] == "fashion-mnist" and own["data"]["test_images"] == 60  # not overwritten
    assert other["data"]["name"] == "folder" and other["data"]["num_classes"] == 2
    assert sub["data"]["test_images"] == 30
    assert sorted(p.name for p in ev.glob("linear*.json")) == [
        "linear--fashion-mnist-test-testsub30.json", "linear--folder-shapes-test.json", "linear.json"]


# 3. train --help, --version, viz filters ---------------------------------------------------

def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _flag_help(parser: argparse.ArgumentParser, flag: str) -> str:
    """The help text ``--help`` prints for ``flag`` (the formatter's, before wrapping)."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    return parser.formatter_class(parser.prog)._get_help_string(action)


def test_train_help_shows_each_default_from_the_config(capsys):
    cfg, parser = Config(), _train_parser()
    # The reference the expected texts are written from: the dataclasses and the presets.
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.weight_decay, cfg.augment.crop_scale, cfg.model.sobel,
            cfg.data.labels) == (5, 256, 1e-5, (0.08, 1.0), True, "folders")
    assert PRESETS["small-images"]["optim"]["epochs"] == 48 and PRESETS["small-images"]["augment"]["crop_scale"] == [
        0.5, 1.0]
    sized = "small-images: from the number of images, see --preset"  # deepcluster.sizing
    for flag, shown in (("--epochs", f"5; {sized}"), ("--batch-size", f"256; {sized}"), ("--weight-decay", "1e-05"),
                        ("--crop-scale", "0.08 1; small-images: 0.5 1"), ("--no-sobel", "off"),
                        ("--labels", "folders"), ("--channels-last", "on"), ("--no-channels-last", "off")):
        assert _flag_help(parser, flag).endswith(f" (default: {shown})"), flag
    assert f"(default: 5; {sized})" in " ".join(_help(["train", "--help"], capsys).split())
    # Every flag whose config default is set shows it, none shows "None", and the flags
    # themselves default to None so that --config and --preset still apply.
    for action in parser._actions:
        if action.dest in TRAIN_FLAGS:
            section, key = TRAIN_FLAGS[action.dest]
            default = getattr(getattr(cfg, section), key)
            text = _flag_help(parser, action.option_strings[0])
            appended = re.search(r" \(default: [^()]*\)$", text)
            assert bool(appended) == (default is not None) and "None" not in text, (action.dest, text)
            assert action.default is None
    for flag in ("--epochs", "--batch-size", "--momentum", "--weight-decay", "--seed"):
        assert not _flag_help(parser, flag).startswith("(default"), flag  # a text of its own


def test_train_arch_and_data_list_their_choices(capsys):
    parser = _train_parser()
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert list(by_flag["--arch"].choices) == list_models() and list(by_flag["--data"].choices) == list(DATASETS)
    assert list(by_flag["--labels"].choices) == ["folders", "none"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--arch", "resnet50"])
    assert e.value.code == 2 and "invalid choice: 'resnet50'" in capsys.readouterr().err
    args = build_parser().parse_args(["train", "--labels", "none"])
    from deepcluster.cli.train import flags_to_overrides

    assert resolve(overrides=flags_to_overrides(args, TRAIN_FLAGS)).data.labels == "none"


def test_building_the_parser_does_not_import_torch():
    """--arch/--data list their choices lazily: ``deepcluster --version`` stays quick."""
    import os
    import subprocess
    import sys

    code = ("import sys; from deepcluster.cli import build_parser; p = build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "p.parse_args(['train', '--arch', 'vgg16']); assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_version_and_viz_filters_flags(capsys):
    import deepcluster

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"deepcluster {deepcluster.__version__}"
    args = build_parser().parse_args(["viz", "filters", "RUN"])
    assert not hasattr(args, "seed") and not hasattr(args, "device")
    for flag in ("--seed", "--device"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["viz", "filters", "RUN", flag, "1"])
        assert "unrecognized arguments" in capsys.readouterr().err
    top = build_parser().parse_args(["viz", "top-images", "RUN", "--seed", "3", "--device", "cpu"])
    assert top.seed == 3 and top.device == "cpu"  # the other figures keep them


# 4. Small floats in the report's config table ---------------------------------------------

def test_report_config_table_prints_small_floats_significantly():
    from deepcluster.report import _config_table

    table = _config_table(Config().to_dict())
    for key, value in (("weight_decay", 1e-5), ("whiten_eps", 1e-6)):
        shown = re.search(rf"<b>{key}</b>&nbsp;([^ <]+)", table).group(1)
        assert shown != "0.000" and float(shown) == pytest.approx(value, rel=0.05), (key, shown)
    assert re.search(r"<b>lr</b>&nbsp;([^ <]+)", table).group(1) == "0.050"


# 5. No empty legend ---------------------------------------------------------------------------

def test_nmi_plot_of_an_unlabelled_run_has_no_legend_and_no_warning():
    import matplotlib.pyplot as plt

    from deepcluster.viz.curves import plot_nmi

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_nmi([{"epoch": 0}])  # epoch 0 of an unlabelled run: nothing to plot
        assert fig.axes[0].get_legend() is None
        plt.close(fig)
        fig = plot_nmi([{"epoch": 0, "nmi_labels": 0.3}, {"epoch": 1, "nmi_labels": 0.4, "nmi_prev": 0.5}])
        legend = fig.axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["NMI(clusters, labels)", "NMI(epoch t-1, epoch t)"]
        plt.close(fig)


# 6. Progress without a terminal ---------------------------------------------------------------

class FakeClock:
    """Each call is ``step`` seconds after the previous one, starting at 0."""

    def __init__(self, step: float) -> None:
        self.t, self.step = -step, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_progress_logs_every_interval_and_the_last(caplog):
    from deepcluster.runtime import progress

    batches = [(torch.zeros(4, 3, 2, 2), torch.arange(4)) for _ in range(10)]
    with caplog.at_level(logging.INFO, logger="deepcluster.runtime"):
        out = list(progress(batches, "extract", interval=30.0, clock=FakeClock(10.0)))
    assert len(out) == 10 and all(a is b for a, b in zip(out, batches))
    # The clock reads 0 at the start and 10 s more after each batch: lines at 30, 60 and
    # 90 s (3, 6, 9 batches of 4 images: 0.4 images/s; ETA (10 - n) x 10 s), then the last.
    assert [r.getMessage() for r in caplog.records] == [
        "extract: 3/10 steps, 12 images, 0.4 images/s, ETA 1:10",
        "extract: 6/10 steps, 24 images, 0.4 images/s, ETA 0:40",
        "extract: 9/10 steps, 36 images, 0.4 images/s, ETA 0:10",
        "extract: 10/10 steps, 40 images, 0.4 images/s",
    ]


def test_progress_short_loops_and_non_batches_and_terminals(caplog, monkeypatch):
    import sys

    from deepcluster.runtime import progress

    with caplog.at_level(logging.INFO, logger="deepcluster.runtime"):
        assert list(progress(range(2), "quick", interval=30.0, clock=FakeClock(10.0))) == [0, 1]
        assert caplog.records == []  # under one interval: silent
        assert list(progress(iter(range(4)), "items", interval=20.0, clock=FakeClock(10.0))) == [0, 1, 2, 3]
        assert [r.getMessage() for r in caplog.records] == ["items: 2 steps, 0.1 steps/s",
                                                             "items: 4 steps, 0.1 steps/s"]
        caplog.clear()
        monkeypatch.setattr(sys, "stderr", type("Tty", (), {"isatty": lambda self: True,
                                                             "write": lambda self, s: len(s),
                                                             "flush": lambda self: None})())
        assert list(progress(range(5), "bar", interval=0.0)) == list(range(5))  # a tqdm bar, no log lines
        assert caplog.records == []


# 7. Data sets to download: not found under the root ------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Every URL fails at once (as it does on a machine without internet): no test downloads."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name, layout", [("cifar10", "cifar-10-batches-py"), ("stl10", "stl10_binary"),
                                          ("mnist", "train-images-idx3-ubyte")])
def test_missing_download_sets_say_where_what_and_that_the_download_failed(name, layout, tmp_path, no_network):
    with pytest.raises(DataError) as e:
        build_source(name, str(tmp_path), "train", download=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name} not found under {tmp_path}") and layout in msg
    assert "a download was attempted and failed (URLError: no network in tests)" in msg
    with pytest.raises(DataError) as e:
        build_source(name, str(tmp_path / "empty"), "test", download=False)
    assert "\n" not in str(e.value) and "no download was attempted" in str(e.value) and layout in str(e.value)


def test_train_on_a_missing_cifar10_is_one_line(tmp_path, capsys, no_network):
    code = main(["train", "--data", "cifar10", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "run")])
    line = _one_line_error(capsys, code, f"cifar10 not found under {tmp_path}")
    assert "cifar-10-batches-py" in line and "download was attempted and failed" in line


# 8. Splits checked against the data set's own list --------------------------------------------

def test_unknown_split_names_the_valid_ones(tiny_mnist_root, photos, tmp_path, capsys):
    with pytest.raises(DataError, match=r"^fashion-mnist has no split 'blah'; valid splits: train, test$"):
        build_source("fashion-mnist", str(tiny_mnist_root), "blah", download=False)
    with pytest.raises(DataError, match=r"stl10 has no split 'val'; valid splits: train, test, unlabeled, "
                                        r"train\+unlabeled$"):
        build_source("stl10", str(tmp_path), "val", download=False)
    assert SPLITS["cifar10"] == ("train", "test") and SPLITS["mnist"] == ("train", "test")
    assert len(build_source("folder", str(photos), "blah")) == 20  # a folder has no splits: ignored
    assert len(build_source("fashion-mnist", str(tiny_mnist_root), "test", download=False)) == 60
    code = main(["train", "--data-root", str(tiny_mnist_root), "--split", "blah", "--output-dir", str(tmp_path / "r")])
    _one_line_error(capsys, code, "fashion-mnist has no split 'blah'; valid splits: train, test")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# Issue 22: values that used to mean something else, or fail later --------------------------

def test_image_size_zero_fc_dim_zero_and_a_config_directory_are_refused(tmp_path, capsys):
    _one_line_error(capsys, main(["train", "--image-size", "0", "--output-dir", str(tmp_path / "a")]),
                    "data.image_size must be >= 16 (or omitted: per data set), got 0")
    _one_line_error(capsys, main(["train", "--fc-dim", "0", "--output-dir", str(tmp_path / "b")]),
                    "model.fc_dim must be >= 1 (or omitted: per architecture), got 0")
    _one_line_error(capsys, main(["train", "--config", str(tmp_path), "--output-dir", str(tmp_path / "c")]),
                    f"config file {tmp_path} is a directory; expected a YAML file")
    assert resolve(overrides={"data": {"image_size": 16}, "model": {"fc_dim": 1}}).data.image_size == 16
    assert dataclasses.asdict(resolve())["data"]["labels"] == "folders"  # today's behaviour by default
