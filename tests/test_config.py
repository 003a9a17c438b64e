import pytest

from deepcluster.config import Config, ConfigError, config_from_dict, load_yaml, resolve, save_yaml


def test_defaults_are_the_papers():
    c = Config()
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.batch_size) == (0.05, 0.9, 1e-5, 256)
    assert (c.cluster.pca_dim, c.cluster.niter, c.model.sobel) == (256, 20, True)


def test_yaml_round_trip(tmp_path):
    cfg = resolve(overrides={"cluster": {"k": 33}, "optim": {"crop_scale": [0.2, 1.0]}})
    save_yaml(cfg, tmp_path / "c.yaml")
    again = resolve(file=tmp_path / "c.yaml")
    assert again == cfg and again.optim.crop_scale == (0.2, 1.0)


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
