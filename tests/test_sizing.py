"""The size rule (deepcluster.sizing): a pure function of N, the preset's values at the
reference size, and how it reaches a run (config.yaml, flags that pin a value, resume)."""

from __future__ import annotations

import math

import pytest

from deepcluster.config import PRESETS, SizeConfig, apply_size_rule, config_from_saved, resolve
from deepcluster.sizing import (BACKBONE_BELOW, MIN_STEPS_PER_EPOCH, REFERENCE_IMAGES, rule_batch, rule_feature, rule_k,
                                rule_pca_dim, rule_steps, size_rule)

SIZES = (1, 9, 10, 100, 500, 1000, 1797, 2000, 5000, 10000, 60000, 1_281_167)


def test_at_the_reference_size_the_rule_gives_the_preset_s_values():
    cfg = resolve(preset="small-images", overrides={"size": {"rule": "off"}})
    r = size_rule(REFERENCE_IMAGES)
    assert r == {"cluster": {"k": cfg.cluster.k, "pca_dim": cfg.cluster.pca_dim, "feature": cfg.cluster.feature},
                 "optim": {"epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size, "lr": cfg.optim.lr}}
    assert PRESETS["small-images"]["size"] == {"rule": "auto"} and PRESETS["paper"] == {}


def test_hand_computed_values():
    # k = round(100 sqrt(N / 60000)) in [10, N / 10]; PCA N // 50 in [8, 256]; batch halved from
    # 256 until an epoch has 32 steps (at least 32); lr 0.05 * batch / 256; steps = 48 epochs.
    assert [rule_k(n) for n in (1000, 2000, 5000, 10000, 60000, 240000)] == [13, 18, 29, 41, 100, 200]
    assert rule_k(50) == 5 and rule_k(9) == 1  # never more than N / 10 clusters (at least 1)
    assert [rule_pca_dim(n) for n in (100, 1000, 2000, 5000, 12800, 60000)] == [8, 20, 40, 100, 256, 256]
    assert [rule_batch(n) for n in (500, 1000, 2000, 5000, 8000, 8193, 60000)] == [32, 32, 64, 128, 256, 256, 256]
    assert size_rule(2000) == {"cluster": {"k": 18, "pca_dim": 40, "feature": "backbone"},
                               "optim": {"epochs": 48, "batch_size": 64, "lr": 0.0125}}
    assert rule_steps(2000) == 48 * 32 and rule_steps(60000) == 48 * 235
    # below 30,000 images the conv stack's output is clustered, from there on fc7 (the paper's)
    assert BACKBONE_BELOW == 30_000
    assert [rule_feature(n) for n in (1, 1797, 10000, 29_999, 30_000, 60000, 1_281_167)] == \
        ["backbone"] * 4 + ["fc7"] * 3


@pytest.mark.parametrize("n", SIZES)
def test_invariants_at_every_size(n):
    r = size_rule(n)
    k, batch, epochs = r["cluster"]["k"], r["optim"]["batch_size"], r["optim"]["epochs"]
    assert 1 <= k <= max(1, n // 10) or (n < 10 and k == 1)
    assert 8 <= r["cluster"]["pca_dim"] <= 256
    assert 32 <= batch <= 256 and batch & (batch - 1) == 0  # a power of two
    assert math.ceil(n / batch) >= MIN_STEPS_PER_EPOCH or batch == 32 or batch == 256
    assert epochs * math.ceil(n / batch) == rule_steps(n)
    assert r["optim"]["lr"] == pytest.approx(0.05 * batch / 256)


def test_monotone_in_n():
    ns = range(100, 200_001, 997)
    for f in (rule_k, rule_pca_dim, rule_batch):
        values = [f(n) for n in ns]
        assert values == sorted(values), f.__name__
    # the steps saw-tooth where the batch doubles, but never fall below 48 epochs of 32 steps
    assert all(rule_steps(n) >= 48 * min(32, math.ceil(n / 32)) for n in ns)


def test_a_user_batch_keeps_the_rule_s_number_of_steps():
    r = size_rule(2000, batch_size=256)  # 8 steps an epoch: 1536 steps -> 192 epochs
    assert r["optim"]["epochs"] == 192


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="at least one image"):
        size_rule(0)


def test_apply_fills_what_the_user_did_not_set_and_records_it():
    cfg = resolve(preset="small-images", overrides={"cluster": {"k": 7}})
    assert cfg.size == SizeConfig(rule="auto", pinned="cluster.k", images=None)
    sized, note = apply_size_rule(cfg, 2000)
    assert (sized.cluster.k, sized.cluster.pca_dim, sized.optim.batch_size, sized.optim.epochs) == (7, 40, 64, 48)
    assert sized.optim.lr == pytest.approx(0.0125) and sized.size.images == 2000
    assert sized.cluster.feature == "backbone" and "feature backbone" in note
    assert "2,000 images" in note and "kept as you set them: cluster.k 7 (rule: 18)" in note
    # applied once: a resumed run (config.yaml says images: 2000) keeps its values
    again, note2 = apply_size_rule(config_from_saved(sized.to_dict()), 50)
    assert again == sized and note2 is None
    # everything else is untouched
    assert sized.augment == cfg.augment and sized.model == cfg.model and sized.run == cfg.run


def test_a_config_file_pins_what_it_sets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.2\n  batch_size: 256\n")
    cfg = resolve(preset="small-images", file=f)
    assert cfg.size.pinned == "optim.batch_size,optim.lr"
    sized, _ = apply_size_rule(cfg, 2000)
    assert (sized.optim.lr, sized.optim.batch_size, sized.optim.epochs, sized.cluster.k) == (0.2, 256, 192, 18)


def test_the_feature_is_kept_where_the_user_or_the_head_needs_fc7():
    # pinned by a flag: kept, the rule's value beside it
    sized, note = apply_size_rule(resolve(preset="small-images", overrides={"cluster": {"feature": "fc7"}}), 2000)
    assert sized.cluster.feature == "fc7" and "cluster.feature fc7 (rule: backbone)" in note
    # the centroid head scores fc7 against the centroids: the rule does not break it
    cfg = resolve(preset="small-images", overrides={"optim": {"head": "centroids"}})
    sized, note = apply_size_rule(cfg, 2000)
    assert sized.cluster.feature == "fc7" and "optim.head centroids scores fc7" in note
    from deepcluster.strategies import choose_head
    choose_head(sized)  # a valid combination
    # at and above the switch the rule gives fc7 whatever the head
    assert apply_size_rule(resolve(preset="small-images"), 30_000)[0].cluster.feature == "fc7"


def test_the_paper_preset_and_rule_off_change_nothing():
    for cfg in (resolve(), resolve(preset="small-images", overrides={"size": {"rule": "off"}})):
        assert apply_size_rule(cfg, 2000) == (cfg, None)


def test_older_run_configs_have_the_rule_off():
    d = resolve(preset="small-images").to_dict()
    del d["size"]  # config.yaml of a run from before the rule
    assert config_from_saved(d).size.rule == "off"


def test_a_run_logs_and_records_the_rule_and_a_resume_keeps_it(tiny_mnist_root, tmp_path, caplog):
    """deepcluster train --preset small-images on 240 images: k 10 (at most N / 10 = 24, at
    least 10), PCA 8 (240 // 50 = 4, at least 8), batch 32, lr 0.00625; --epochs given, kept."""
    import logging

    import yaml

    from deepcluster.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "small-images", "--data-root", str(tiny_mnist_root), "--workers", "0",
            "--output-dir", str(out), "--amp", "none"]
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        assert main([*args, "--epochs", "1"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("size rule"))
    assert "240 images: k 10, PCA 8" in line and "kept as you set them: optim.epochs 1 (rule: 48)" in line
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["size"] == {"rule": "auto", "pinned": "optim.epochs", "images": 240}
    assert (saved["cluster"]["k"], saved["cluster"]["pca_dim"], saved["optim"]["batch_size"], saved["optim"]["epochs"],
            saved["optim"]["lr"]) == (10, 8, 32, 1, 0.00625)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepcluster"):
        assert main([*args, "--resume", "--epochs", "2"]) == 0
    assert not any(r.getMessage().startswith("size rule") for r in caplog.records)  # chosen once, kept
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert again["size"]["images"] == 240 and again["optim"]["epochs"] == 2 and again["cluster"]["pca_dim"] == 8


def test_train_help_states_the_rule_from_its_constants(capsys):
    from deepcluster.cli import build_parser
    from deepcluster.sizing import rule_text

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert rule_text() in text and "k = 100 sqrt(N / 60,000) in [10, N / 10], PCA N / 50 in [8, 256]" in text
