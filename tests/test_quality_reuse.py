"""benchmarks/quality.py reads back a protocol's result only when it holds exactly the
measurement asked for: same checkpoint file, images and settings."""

import json
import os

import pytest

from conftest import load_benchmark, train_tiny
from deepcluster.eval import Grid, open_checkpoint



@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("quality") / "run")


def settings(epochs=1, steps=2):
    return {"protocols": ["linear", "knn", "clusters", "finetune"], "fractions": [0.5], "finetune_steps": steps,
            "linear": Grid(lrs=[0.1], weight_decays=[0.0], epochs=epochs, batch_size=64),
            "mlp": Grid(lrs=[0.1], weight_decays=[0.0], epochs=1, batch_size=64)}


def measure(quality, run, s, fresh=False):
    ctx = open_checkpoint(run, workers=0, seed=0)
    return quality.run_protocols(ctx, s, net=True, finetune_modes=["all"], fresh=fresh)


def test_second_invocation_reads_back_and_changes_measure_again(quality, tiny_run):
    m1, info1 = measure(quality, tiny_run, settings())
    assert info1["reused"] == [] and info1["eval_s"] > 0
    linear_file = tiny_run / "eval" / "linear.json"
    stamp = linear_file.stat().st_mtime_ns

    m2, info2 = measure(quality, tiny_run, settings())
    assert info2["reused"] == ["linear", "knn", "clusters", "finetune_all_50pct"]
    assert m2 == m1 and linear_file.stat().st_mtime_ns == stamp  # nothing rewritten
    # The seconds measured the first time count again, so the row's eval time is not 0.
    assert info2["eval_s"] == pytest.approx(sum(json.loads((tiny_run / "eval" / f"{n}.json").read_text())["seconds"]
                                                for n in info2["reused"]))

    # A changed setting measures that protocol again, and only it.
    _, info3 = measure(quality, tiny_run, settings(epochs=2))
    assert info3["reused"] == ["knn", "clusters", "finetune_all_50pct"]
    assert json.loads(linear_file.read_text())["grid"]["epochs"] == 2

    _, info = measure(quality, tiny_run, settings(epochs=2, steps=3))  # a nested setting counts too
    assert info["reused"] == ["linear", "knn", "clusters"]

    # --fresh measures everything.
    _, info4 = measure(quality, tiny_run, settings(epochs=2), fresh=True)
    assert info4["reused"] == []


def test_a_newer_checkpoint_invalidates_earlier_results(quality, tiny_run):
    measure(quality, tiny_run, settings())
    ckpt = tiny_run / "checkpoint.pt"
    later = (tiny_run / "eval" / "knn.json").stat().st_mtime + 10
    os.utime(ckpt, (later, later))  # as if the run had been trained again after the evaluation
    _, info = measure(quality, tiny_run, settings())
    assert info["reused"] == []


def test_results_of_other_images_are_not_reused(quality, tiny_run):
    measure(quality, tiny_run, settings())
    ctx = open_checkpoint(tiny_run, workers=0, seed=0, test_subset=30)
    _, info = quality.run_protocols(ctx, settings(), net=True, finetune_modes=["all"])
    assert info["reused"] == []


def test_a_row_is_named_by_what_the_run_changes_from_its_preset(quality):
    from deepcluster.config import resolve

    plain = resolve(preset="small-images").to_dict()
    assert quality.changes_from_preset(plain) == []
    changed = resolve(preset="small-images", overrides={
        "optim": {"balance": "weight", "epochs": 3}, "augment": {"crop_scale": [0.5, 1.0]},
        "cluster": {"method": "pic", "feature": "backbone"}, "run": {"amp": "fp16", "workers": 0}}).to_dict()
    assert sorted(quality.changes_from_preset(changed)) == ["PIC", "amp fp16", "balance weight", "feature backbone"]
    # a run from before an option existed had its default, which the row must name
    old = resolve(preset="small-images").to_dict()
    del old["optim"]["lr_schedule"], old["run"]["amp"]
    assert sorted(quality.changes_from_preset(old)) == ["amp none", "lr_schedule constant"]
    # the size rule's values are the preset's at the run's size; what the user pinned is named
    from deepcluster.config import apply_size_rule

    sized = apply_size_rule(resolve(preset="small-images", overrides={"cluster": {"k": 7}}), 2000)[0].to_dict()
    assert quality.changes_from_preset(sized) == ["k 7"]


def test_results_md_keeps_the_sections_other_benchmarks_write(quality, tmp_path):
    target = tmp_path / "RESULTS.md"
    quality.write_keeping_sections(target, "# generated 1")
    assert target.read_text() == "# generated 1"
    target.write_text(target.read_text() + f"\n\n{quality.KEPT_MARKER}\n## Any size\n| a |\n")
    quality.write_keeping_sections(target, "# generated 2")
    assert target.read_text() == f"# generated 2\n\n{quality.KEPT_MARKER}\n## Any size\n| a |\n"
