import pytest

from deepcluster.config import Config, ConfigError, config_from_dict, config_from_saved, load_yaml, resolve, save_yaml


def test_defaults_are_the_papers():
    c = Config()
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.batch_size) == (0.05, 0.9, 1e-5, 256)
    assert (c.cluster.pca_dim, c.cluster.niter, c.model.sobel) == (256, 20, True)


def test_yaml_round_trip(tmp_path):
    cfg = resolve(overrides={"cluster": {"k": 33}, "augment": {"crop_scale": [0.2, 1.0]}})
    save_yaml(cfg, tmp_path / "c.yaml")
    again = resolve(file=tmp_path / "c.yaml")
    assert again == cfg and again.augment.crop_scale == (0.2, 1.0)


def test_flags_override_file(tmp_path):
    (tmp_path / "c.yaml").write_text("cluster:\n  k: 50\noptim:\n  lr: 0.01\n")
    cfg = resolve(file=tmp_path / "c.yaml", overrides={"cluster": {"k": 7}})
    assert cfg.cluster.k == 7 and cfg.optim.lr == 0.01


@pytest.mark.parametrize("d, match", [
    ({"cluster": {"kk": 3}}, "unknown config key cluster.kk"),
    ({"clustering": {}}, "unknown config section 'clustering'"),
    ({"cluster": {"k": "ten"}}, "cluster.k: expected int"),
    ({"optim": {"lr": True}}, "optim.lr"),
    ({"model": {"sobel": "yes"}}, "model.sobel: expected true/false"),
    ({"cluster": {"k": 0}}, "cluster.k must be >= 1"),
    ({"optim": {"balance": "magic"}}, "optim.balance"),
])
def test_bad_configs_name_the_key(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("cluster: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve(preset="nope")


@pytest.mark.parametrize("d, match", [
    ({"augment": {"affine": -1.0}}, "augment.affine"),
    ({"augment": {"erasing": 1.5}}, "augment.erasing"),
    ({"augment": {"jitter": -0.5}}, "augment.jitter"),
    ({"augment": {"blur": 1.5}}, "augment.blur"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
])
def test_augmentation_and_dropout_ranges(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_channels_last_is_the_default_and_can_be_switched_off():
    import argparse

    from deepcluster.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_parser(parser.add_subparsers())
    layout = lambda *flags: resolve(overrides=cli_train.flags_to_overrides(  # noqa: E731
        parser.parse_args(["train", *flags]), cli_train.TRAIN_FLAGS)).run.channels_last
    assert layout() is True and layout("--channels-last") is True and layout("--no-channels-last") is False
    assert resolve(preset="small-images").run.channels_last is True


def test_augmentation_flags_reach_the_config_and_the_transform():
    import argparse

    import torchvision.transforms as T

    from deepcluster.cli import train as cli_train
    from deepcluster.data import image_spec, train_transform, train_transform_from

    parser = argparse.ArgumentParser()
    cli_train.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--crop-scale", "0.4", "0.9", "--no-hflip", "--affine", "0.5",
                              "--erasing", "0.25", "--dropout", "0.1", "--no-whiten", "--jitter", "0.5",
                              "--blur", "0.3", "--whiten-eps", "0.01"])
    cfg = resolve(overrides=cli_train.flags_to_overrides(args, cli_train.TRAIN_FLAGS))
    assert cfg.augment.crop_scale == (0.4, 0.9) and cfg.augment.hflip is False
    assert (cfg.augment.affine, cfg.augment.erasing, cfg.model.dropout, cfg.cluster.whiten) == (0.5, 0.25, 0.1, False)
    assert (cfg.augment.jitter, cfg.augment.blur, cfg.cluster.whiten_eps) == (0.5, 0.3, 0.01)
    ops = train_transform_from(image_spec("fashion-mnist"), cfg.augment).transforms
    kinds = [type(o) for o in ops]
    assert kinds == [T.RandomAffine, T.RandomResizedCrop, T.RandomApply, T.RandomApply, T.ToTensor, T.Normalize,
                     T.RandomErasing]
    assert ops[0].degrees == [-7.5, 7.5] and ops[1].scale == (0.4, 0.9) and ops[6].p == 0.25
    jit, blur = ops[2].transforms[0], ops[3].transforms[0]
    assert ops[2].p == 0.8 and jit.brightness == jit.contrast == (0.8, 1.2)
    assert ops[3].p == 0.3 and blur.kernel_size == (3, 3) and blur.sigma == (0.1, 2.0)
    # Off by default: the paper's crop + flip only (also for a run's config that predates the keys).
    plain = [type(o) for o in train_transform(image_spec("fashion-mnist")).transforms]
    assert plain == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    old = config_from_saved({"optim": {"lr": 0.05}})  # a run's config that predates the keys
    assert [type(o) for o in train_transform_from(image_spec("fashion-mnist"), old.augment).transforms] == plain


def test_presets_paper_is_the_defaults_small_images_changes_only_what_the_ablation_chose():
    from deepcluster.config import PRESETS

    assert resolve(preset="paper") == resolve()
    small, paper = resolve(preset="small-images").to_dict(), resolve(preset="paper").to_dict()
    changed = {(s, k) for s in paper if isinstance(paper[s], dict) for k in paper[s] if small[s][k] != paper[s][k]}
    assert changed == {(s, k) for s, d in PRESETS["small-images"].items() for k in d}
    assert small["preset"] == "small-images"
    # flags and files still override a preset
    assert resolve(preset="small-images", overrides={"optim": {"epochs": 3}}).optim.epochs == 3


def test_configs_of_older_runs_load_as_today_s_typed_config():
    """Every config.yaml recorded in the repository (written before the augment section
    existed, with the augmentation in optim) loads, migrated, with its values kept."""
    from pathlib import Path

    from deepcluster.config import config_from_saved

    root = Path(__file__).resolve().parent.parent
    files = sorted(root.glob("experiments/runs/*/config.yaml")) + sorted(root.glob("experiments/runs/*/config.yaml"))
    assert files
    for f in files:
        raw = load_yaml(f)
        cfg = config_from_saved(raw)
        old_optim = raw.get("optim", {})
        if "crop_scale" in old_optim:  # the old layout: moved, not lost
            assert cfg.augment.crop_scale == tuple(old_optim["crop_scale"])
            assert cfg.augment.jitter == old_optim.get("jitter", 0.0)
        assert cfg.optim.epochs == old_optim.get("epochs", cfg.optim.epochs)
