"""End to end: ``deepcluster eval`` on a tiny checkpoint, the baselines, the one-line
errors, and the training-time k-NN probe (``--eval-every``)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import train_tiny
from deepcluster.checkpoint import load_checkpoint, load_model
from deepcluster.cli import main
from deepcluster.config import resolve
from deepcluster.train import train


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist_root, tmp_path_factory):
    return train_tiny(tiny_mnist_root, tmp_path_factory.mktemp("eval") / "run", run={"eval_every": 2})


def run_eval(*args):
    return main(["eval", *args, "--workers", "0"])


def test_eval_every_logs_the_knn_probe(tiny_run):
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert "knn_top1" not in records[0]  # epoch 1 of 2: not a multiple of --eval-every 2
    assert 0.0 <= records[1]["knn_top1"] <= 1.0 and "knn_weighted_top1" in records[1]


def test_every_protocol_end_to_end(tiny_run, capsys):
    assert run_eval("linear", "--checkpoint", str(tiny_run), "--layers", "conv1,conv3", "--epochs", "2",
                    "--lrs", "0.1", "--weight-decays", "0,1e-3") == 0
    lin = json.loads((tiny_run / "eval" / "linear.json").read_text())
    assert set(lin["metrics"]) == {"linear_conv1", "linear_conv3"}
    assert lin["layers"]["conv1"]["dim"] == 3072 and lin["layers"]["conv3"]["pool"] == 4
    assert len(lin["layers"]["conv1"]["grid"]) == 2 and lin["data"]["test_images"] == 60
    assert lin["machine"]["cores"] >= 1 and "linear_conv1\t" in capsys.readouterr().out

    assert run_eval("mlp", "--checkpoint", str(tiny_run), "--epochs", "1", "--lrs", "0.05") == 0
    assert run_eval("knn", "--checkpoint", str(tiny_run), "--k", "5") == 0
    assert run_eval("clusters", "--checkpoint", str(tiny_run), "--n-init", "1") == 0
    assert run_eval("finetune", "--checkpoint", str(tiny_run), "--label-fraction", "0.5", "--steps", "3",
                    "--fc-only") == 0
    ev = tiny_run / "eval"
    assert 0 <= json.loads((ev / "mlp.json").read_text())["metrics"]["mlp"] <= 1
    knn = json.loads((ev / "knn.json").read_text())
    assert knn["feature"] == "fc7" and knn["k"] == 5 and knn["reference_images"] == 240
    cl = json.loads((ev / "clusters.json").read_text())
    assert cl["k"] == 10 and cl["best"] in ("whitened", "l2")
    assert cl["training_assignments"]["k"] == 10 and {"nmi", "acc", "ari"} <= set(cl["metrics"])
    ft = json.loads((ev / "finetune_fc_50pct.json").read_text())
    assert ft["labelled_images"] == 120 and ft["per_class"] == [12] * 10  # 0.5 * 240 images / 10 classes
    assert "finetune_fc_50pct" in ft["metrics"]


def test_baselines_are_checkpoints_the_protocols_accept(tiny_run, tmp_path):
    assert main(["eval", "baseline", "random", "--checkpoint", str(tiny_run), "--output", str(tmp_path / "rand")]) == 0
    assert main(["eval", "baseline", "supervised", "--checkpoint", str(tiny_run), "--output",
                 str(tmp_path / "sup.pt"), "--epochs", "1", "--workers", "0"]) == 0
    model, state = load_model(tmp_path / "sup.pt")
    assert state["meta"]["method"] == "supervised" and model.num_clusters == 10 and state["train_seconds"] > 0
    assert run_eval("knn", "--checkpoint", str(tmp_path / "sup.pt")) == 0
    knn = json.loads((tmp_path / "sup_eval" / "knn.json").read_text())
    assert knn["method"] == "supervised"
    _, rstate = load_model(tmp_path / "rand")
    assert rstate["meta"]["method"] == "random"
    assert run_eval("knn", "--pixels", "--data", "fashion-mnist", "--data-root", _root(tiny_run),
                    "--output-dir", str(tmp_path / "pixels")) == 0
    pix = json.loads((tmp_path / "pixels" / "knn.json").read_text())
    assert pix["method"] == "pixels" and pix["dim"] == 784


def _root(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]


def _one_line_error(capsys, code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("deepcluster: error:") and needle in err[0], err


def test_bad_input_gives_one_line_errors(tiny_run, tmp_path, capsys):
    _one_line_error(capsys, run_eval("linear", "--checkpoint", str(tiny_run), "--layers", "conv9"),
                    "unknown layer(s) conv9; this model has conv1, conv2, conv3, conv4, conv5")
    _one_line_error(capsys, run_eval("finetune", "--checkpoint", str(tiny_run), "--label-fraction", "0.01"),
                    "--label-fraction 0.01 leaves every class empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    _one_line_error(capsys, run_eval("linear", "--checkpoint", str(tiny_run), "--data", "folder", "--data-root",
                                     str(flat)), "linear needs labels but data set 'folder'")
    _one_line_error(capsys, run_eval("mlp", "--checkpoint", str(tmp_path / "missing")), "no checkpoint at")
    _one_line_error(capsys, run_eval("knn"), "needs --checkpoint RUN_DIR_OR_FILE or --pixels")
    # A checkpoint trained on unlabelled images: the supervised protocols name the fix.
    unl = tmp_path / "unlabelled-run"
    train(resolve(overrides={"data": {"name": "folder", "root": str(flat)},  # size from the images: 28
                             "cluster": {"k": 2, "pca_dim": 4}, "optim": {"epochs": 1, "batch_size": 8},
                             "run": {"output_dir": str(unl), "workers": 0}}))
    assert load_checkpoint(unl / "checkpoint.pt")["meta"]["image_size"] == 28
    _one_line_error(capsys, run_eval("knn", "--checkpoint", str(unl)),
                    "knn needs labels but data set 'folder' at")
    _one_line_error(capsys, main(["eval", "baseline", "supervised", "--checkpoint", str(unl), "--output",
                                  str(tmp_path / "s")]), "the supervised baseline needs labels")


def test_knn_and_clusters_on_another_feature_write_their_own_file(tiny_run, capsys):
    ev = tiny_run / "eval"
    assert run_eval("knn", "--checkpoint", str(tiny_run), "--k", "5", "--feature", "conv3") == 0
    assert run_eval("clusters", "--checkpoint", str(tiny_run), "--n-init", "1", "--feature", "backbone") == 0
    knn = json.loads((ev / "knn-conv3.json").read_text())
    assert knn["feature"] == "conv3" and knn["k"] == 5
    assert json.loads((ev / "clusters-backbone.json").read_text())["feature"] == "backbone"
    if (ev / "knn.json").exists():  # the default result is not overwritten
        assert json.loads((ev / "knn.json").read_text())["feature"] == "fc7"
    capsys.readouterr()
    assert run_eval("knn", "--checkpoint", str(tiny_run), "--feature", "conv9") != 0
    assert "unknown feature 'conv9'" in capsys.readouterr().err


def test_clusters_repeats_report_each_draw_and_their_mean_and_sd(tiny_run, capsys):
    from deepcluster.clustering import PCAWhitening, l2_normalize
    from deepcluster.eval import cluster_scores
    from deepcluster.eval.clusters import best_kmeans, clusters_eval
    from deepcluster.eval.context import open_checkpoint

    assert run_eval("clusters", "--checkpoint", str(tiny_run), "--n-init", "2", "--repeats", "3") == 0
    out = json.loads((tiny_run / "eval" / "clusters.json").read_text())
    assert "nmi_mean\t" in capsys.readouterr().out
    draws, m = out["repeats"], out["metrics"]
    assert len(draws) == 3 and draws[0] == {k: m[k] for k in ("nmi", "acc", "ari")}  # draw 0: the protocol's score
    for key in ("nmi", "acc", "ari"):
        values = np.array([d[key] for d in draws])
        assert m[f"{key}_mean"] == pytest.approx(values.mean()) and m[f"{key}_sd"] == pytest.approx(values.std(ddof=1))
    # reference: draw r is the lowest-loss of n_init k-means seeded seed + r * n_init on the chosen preprocessing
    ctx = open_checkpoint(tiny_run, workers=0)
    feature = ctx.encoder.feature(None)
    train = np.asarray(ctx.store.get("train", [feature])[feature], dtype=np.float32)
    test = np.asarray(ctx.store.get("test", [feature])[feature], dtype=np.float32)
    prep = {"l2": l2_normalize, "whitened": PCAWhitening(out["pca_dim"]).fit(train).transform}[out["best"]]
    for r, d in enumerate(draws):
        want = cluster_scores(best_kmeans(prep(test), 10, 2, 20, ctx.seed + 2 * r), ctx.data.test_labels)
        assert d == pytest.approx({k: want[k] for k in ("nmi", "acc", "ari")})
    # one draw (the default) adds no mean / sd; a bad count is a one-line error
    single = clusters_eval(ctx, n_init=2, write=False)
    assert "nmi_mean" not in single["metrics"] and single["metrics"]["nmi"] == pytest.approx(m["nmi"])
    assert run_eval("clusters", "--checkpoint", str(tiny_run), "--repeats", "0") == 1
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_random_init_seed_defaults_to_the_run_s_and_other_seeds_differ(tiny_run, tmp_path):
    import torch

    from deepcluster.eval import make_random_init
    from deepcluster.eval.nettrain import fresh_model

    own = torch.load(make_random_init(tiny_run, tmp_path / "own"), weights_only=True)
    same = torch.load(make_random_init(tiny_run, tmp_path / "s0", seed=0), weights_only=True)  # the fixture's seed
    other = torch.load(make_random_init(tiny_run, tmp_path / "s1", seed=1), weights_only=True)
    w = "features.0.weight" if "features.0.weight" in own["model"] else next(iter(own["model"]))
    assert torch.equal(own["model"][w], same["model"][w]) and not torch.equal(own["model"][w], other["model"][w])
    assert "init_seed" not in own and other["init_seed"] == 1
    start = fresh_model(torch.load(tiny_run / "checkpoint.pt", weights_only=True)).state_dict()
    assert torch.equal(own["model"][w], start[w])
