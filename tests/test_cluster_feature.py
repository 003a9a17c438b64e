"""``--cluster-feature backbone``: the training loop clusters the conv stack's output
instead of fc7, and every reader of the run (eval, export, assign, viz, resume) follows."""

import json

import pytest
import torch

from conftest import assigned_like_training, train_tiny
from deepcluster.checkpoint import CheckpointError, load_checkpoint, load_model
from deepcluster.cli import main
from deepcluster.config import ConfigError, resolve
from deepcluster.models import create_model
from deepcluster.strategies import choose_head
from deepcluster.train import TrainingError, train


def test_backbone_feature_is_the_flattened_conv_output_and_the_head_still_reads_fc7():
    torch.manual_seed(0)
    fc7 = create_model("alexnet_small", image_size=28, num_clusters=7).eval()
    bb = create_model("alexnet_small", image_size=28, num_clusters=7, cluster_feature="backbone").eval()
    bb.load_state_dict(fc7.state_dict())  # same parameters: the choice adds or removes none
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        conv = torch.flatten(fc7.features(fc7.sobel(x)), 1)
        assert bb.feature_dim == bb.backbone_dim == conv.shape[1] == 128 * 3 * 3
        assert fc7.feature_dim == fc7.fc_dim == 1024
        torch.testing.assert_close(bb.forward_features(x), conv)
        torch.testing.assert_close(fc7.forward_features(x), fc7.classifier(conv))
        # the pseudo-label classifier is fc6 -> fc7 -> head for both
        torch.testing.assert_close(bb(x), fc7.head(torch.relu(fc7.classifier(conv))))
        torch.testing.assert_close(bb(x), fc7(x))
    bb.reset_head(5)
    assert bb.head.in_features == 1024


def test_unknown_cluster_feature_and_centroid_head_are_refused():
    with pytest.raises(ValueError, match="clustering feature"):
        create_model("alexnet_small", image_size=28, cluster_feature="conv3")
    with pytest.raises(ConfigError, match="cluster.feature"):
        resolve(overrides={"cluster": {"feature": "conv3"}})
    with pytest.raises(ConfigError, match="not cluster.feature backbone"):
        choose_head(resolve(overrides={"cluster": {"feature": "backbone"}, "optim": {"head": "centroids"}}))


@pytest.fixture(scope="module")
def backbone_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("bb") / "run", cluster={"feature": "backbone"})


def test_the_run_clusters_the_backbone(backbone_run):
    state = load_checkpoint(backbone_run)
    assert state["meta"]["cluster_feature"] == "backbone"
    model, _ = load_model(backbone_run)
    assert model.cluster_feature == "backbone"
    # the PCA of the last epoch was fitted on backbone features: its input width is C*h*w
    assert state["pca"]["mean"].numel() == model.backbone_dim == 1152 != model.fc_dim


def test_eval_defaults_to_the_clustered_feature(backbone_run):
    assert main(["eval", "clusters", "--checkpoint", str(backbone_run), "--workers", "0"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(backbone_run), "--workers", "0"]) == 0
    res = json.loads((backbone_run / "eval" / "clusters.json").read_text())
    knn = json.loads((backbone_run / "eval" / "knn.json").read_text())
    assert res["feature"] == knn["feature"] == "backbone" and knn["dim"] == 1152
    assert main(["eval", "knn", "--checkpoint", str(backbone_run), "--workers", "0", "--feature", "fc7"]) == 0
    assert json.loads((backbone_run / "eval" / "knn-fc7.json").read_text())["dim"] == 1024


def test_assign_maps_training_images_to_their_backbone_clusters(backbone_run, tiny_mnist_root, tmp_path):
    assert assigned_like_training(backbone_run, tiny_mnist_root, tmp_path) >= 0.99


def test_resume_with_another_cluster_feature_is_refused(backbone_run, tiny_mnist_root):
    cfg = resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False},
                             "cluster": {"k": 10, "pca_dim": 32, "feature": "fc7"},
                             "optim": {"epochs": 3, "batch_size": 64},
                             "run": {"output_dir": str(backbone_run), "workers": 0, "resume": True}})
    with pytest.raises((CheckpointError, TrainingError), match="cluster_feature='backbone'"):
        train(cfg)
    before = (backbone_run / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 2  # nothing was lost or added


def test_an_old_checkpoint_without_the_key_is_an_fc7_run(tiny_mnist_root, tmp_path):
    run = train_tiny(tiny_mnist_root, tmp_path / "run", optim={"epochs": 1})
    state = load_checkpoint(run)
    del state["meta"]["cluster_feature"]  # as written before the option existed
    torch.save(state, run / "checkpoint.pt")
    model, _ = load_model(run)
    assert model.cluster_feature == "fc7"
    cfg = resolve(overrides={"data": {"root": str(tiny_mnist_root), "download": False},
                             "cluster": {"k": 10, "pca_dim": 32}, "optim": {"epochs": 2, "batch_size": 64},
                             "run": {"output_dir": str(run), "workers": 0, "resume": True}})
    train(cfg)  # resumes: the missing key reads as fc7
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_report_of_a_backbone_run(backbone_run):
    from deepcluster.report import ReportOptions, build_report

    index = build_report(backbone_run, options=ReportOptions(synth_steps=5, num_filters=2, queries=2, neighbors=2,
                                                             per_cluster=8))
    assert index.exists() and "backbone" in (backbone_run / "config.yaml").read_text()
