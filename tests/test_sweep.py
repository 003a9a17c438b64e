"""``deepcluster sweep``: one run per k on the tiny fixture, its table checked against the
run folders (scikit-learn NMI, numpy cluster sizes), a second call that trains and
evaluates nothing, an interrupted member resumed, and the one-line errors."""

import json

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from conftest import train_tiny
from deepcluster.cli import main
from deepcluster.labelfree import cluster_stability
from deepcluster.sweep import SweepError, check_ks, parse_ks, run_sweep

EPOCHS = 2
KS = (5, 12)


def tiny_overrides(root):
    """The settings of ``conftest.train_tiny`` without its k, epochs and output folder."""
    return {"data": {"root": str(root), "download": False}, "cluster": {"pca_dim": 32},
            "optim": {"batch_size": 64}, "run": {"workers": 0}}


@pytest.fixture(scope="module")
def sweep(tiny_mnist_root, tmp_path_factory):
    """A sweep over k = 5, 12 whose k = 5 member was interrupted after 1 of its 2 epochs."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    interrupted = train_tiny(tiny_mnist_root, out / "k5", cluster={"k": 5}, optim={"epochs": 1})
    before = {"metrics": (interrupted / "metrics.jsonl").read_text().splitlines(),
              "assignments": np.load(interrupted / "assignments.npy")}
    rows = run_sweep(tiny_overrides(tiny_mnist_root), list(KS), EPOCHS, out)
    return out, rows, before


def nmi_geometric(a, b):
    """scikit-learn's NMI normalised as the paper's: I(A;B) / sqrt(H(A) H(B))."""
    return normalized_mutual_info_score(a, b, average_method="geometric")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_member_is_resumed_not_restarted(sweep):
    out, _, before = sweep
    after = records(out / "k5")
    assert [r["epoch"] for r in after] == [0, 1]
    assert json.loads(before["metrics"][0]) == after[0]  # epoch 0 kept as it was, not trained again
    hist = np.load(out / "k5" / "assignments.npy")
    assert hist.shape == (2, 240) and np.array_equal(hist[0], before["assignments"][0])
    assert [r["epoch"] for r in records(out / "k12")] == [0, 1]


def test_rows_match_the_run_folders(sweep):
    out, rows, _ = sweep
    assert [r["k"] for r in rows] == list(KS)
    for row in rows:
        run = out / f"k{row['k']}"
        recs, hist = records(run), np.load(run / "assignments.npy")
        sizes = np.bincount(hist[-1], minlength=row["k"])
        assert row["epochs"] == EPOCHS and row["num_images"] == 240
        assert (row["size_min"], row["size_median"], row["size_max"]) == (sizes.min(), np.median(sizes), sizes.max())
        assert row["nmi_prev"] == pytest.approx(nmi_geometric(hist[-2], hist[-1]), abs=1e-6)
        assert row["rankme"] == pytest.approx(recs[-1]["rankme"])
        assert row["minutes"] == pytest.approx(sum(r["epoch_s"] for r in recs) / 60)
        assert 0.0 <= row["stability"] <= 1.0
        rng = np.random.default_rng(0)  # chance level: NMI with 3 shuffled copies of the last clusters
        chance = np.mean([nmi_geometric(hist[-1], rng.permutation(hist[-1])) for _ in range(3)])
        assert row["nmi_chance"] == pytest.approx(chance, abs=1e-6)
        # the labelled scores are those the eval protocols wrote for this checkpoint
        assert row["labelled"] and row["num_classes"] == 10 and row["eval_test_images"] == 60
        assert row["knn"] == json.loads((run / "eval" / "knn.json").read_text())["metrics"]["knn"]
        clusters = json.loads((run / "eval" / "clusters.json").read_text())["metrics"]
        assert (row["nmi"], row["acc"]) == (clusters["nmi"], clusters["acc"])


def test_stability_is_on_the_features_the_last_epoch_clustered(sweep, tmp_path):
    """The run's PCA-whitened features, re-extracted by ``export --features pca``, give the
    same stability (the k-means seeds are fixed)."""
    out, rows, _ = sweep
    table = tmp_path / "k5.npy"
    assert main(["export", str(out / "k5"), "--format", "npy", "--features", "pca", "-o", str(table)]) == 0
    z = np.load(table)["feature"]
    assert z.shape == (240, 32)
    assert rows[0]["stability"] == pytest.approx(cluster_stability(z, 5, (0, 1, 2)), abs=1e-6)


def test_summary_files(sweep):
    out, rows, _ = sweep
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["k"] for r in summary["rows"]] == list(KS) and summary["settings"]["epochs"] == EPOCHS
    md = (out / "sweep.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| k | epochs | minutes | kNN | NMI | ACC | RankMe | stability | NMI-prev | chance NMI "
                               "| sizes")
    for line, row in zip(lines[1:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(row["k"]) and cells[1] == str(EPOCHS)
        assert cells[3] == f"{100 * row['knn']:.1f} %" and cells[4] == f"{row['nmi']:.3f}"
        assert cells[10] == f"{row['size_min']}/{row['size_median']:g}/{row['size_max']}"
    assert len(lines) == 1 + len(KS)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_call_runs_nothing_again(sweep, tiny_mnist_root):
    out, rows, _ = sweep
    watched = [out / f"k{k}" / name for k in KS for name in ("checkpoint.pt", "metrics.jsonl", "eval/knn.json")]
    mtimes = [p.stat().st_mtime_ns for p in watched]
    again = run_sweep(tiny_overrides(tiny_mnist_root), list(KS), EPOCHS, out)
    assert [p.stat().st_mtime_ns for p in watched] == mtimes  # nothing trained or evaluated again
    assert again == json.loads((out / "sweep.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_unlabelled_data_skips_the_labelled_scores_and_says_so(tiny_mnist_root, tmp_path):
    from deepcluster.data import build_source

    images = tmp_path / "photos"  # a flat folder of images: no class sub-folders, no labels
    images.mkdir()
    source = build_source("fashion-mnist", str(tiny_mnist_root), "train", download=False)
    for i in range(60):
        source.load(i).save(images / f"{i:03d}.png")
    overrides = {"data": {"name": "folder", "root": str(images)}, "cluster": {"pca_dim": 16},
                 "optim": {"batch_size": 32}, "run": {"workers": 0}}
    (row,) = run_sweep(overrides, [4], 1, tmp_path / "sweep")
    assert (row["knn"], row["nmi"], row["acc"], row["labelled"]) == (None, None, None, False)
    assert row["size_min"] + row["size_max"] <= 60 and 0 <= row["stability"] <= 1 and row["rankme"] > 0
    md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| 4 | 1 | " in md and " | — | — | — | " in md
    assert "Note: no labels: k-NN, NMI and ACC not measured." in md
    assert not (tmp_path / "sweep" / "k4" / "eval" / "knn.json").exists()


def test_list_of_k():
    assert parse_ks("300, 30,100") == [30, 100, 300]
    for text, words in (("", "empty"), (" , ", "list"), ("30,abc", "'abc' is not an integer"), ("0", ">= 1"),
                        ("10,-3", ">= 1, got -3"), ("30,30", "30 is listed more than once")):
        with pytest.raises(SweepError, match=words if words != "empty" else "comma-separated"):
            parse_ks(text)
    with pytest.raises(SweepError, match="empty"):
        check_ks([])


@pytest.mark.parametrize("ks, message", [
    ("0", "--k: every number of clusters must be >= 1, got 0"),
    ("5,241", "--k 241 is larger than the number of images (240); lower it"),
    ("", "--k: give a comma-separated list of cluster counts, e.g. --k 30,100,300"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_mnist_root, tmp_path, capsys, ks, message):
    out = tmp_path / "sweep"
    code = main(["sweep", "--k", ks, "--epochs", "1", "--data-root", str(tiny_mnist_root), "--pca-dim", "32",
                 "--workers", "0", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"deepcluster: error: {message}\n"
    assert not out.exists()


def test_a_member_with_more_epochs_than_asked_is_refused(sweep, tiny_mnist_root):
    out, _, _ = sweep
    with pytest.raises(SweepError, match=r"k5 has 2 epochs, more than --epochs 1; ask for --epochs 2"):
        run_sweep(tiny_overrides(tiny_mnist_root), [5], 1, out)


def test_pic_has_no_k_to_sweep(tiny_mnist_root, tmp_path):
    overrides = {**tiny_overrides(tiny_mnist_root), "cluster": {"method": "pic"}}
    with pytest.raises(SweepError, match="a sweep varies k-means' k; --clustering pic has no k"):
        run_sweep(overrides, [5], 1, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_help_takes_every_train_flag_and_a_list_of_k(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "--k K1,K2,... comma-separated numbers of clusters" in text and "(default: 100)" not in text
    assert "(default: 5; small-images: from the number of images, see --preset)" in text  # --epochs, as train shows it
    for flag in ("--preset", "--subset", "--lr-schedule", "--head", "--eval-subset", "--eval-test-subset"):
        assert flag in text, flag


# ---------------------------------------------------------------- do the label-free signals track?

def test_spearman_against_hand_ranks():
    from deepcluster.sweep_track import spearman

    # ranks 1 2 3 4 against 1 2 4 3: d^2 = 0 + 0 + 1 + 1, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks 1.5 1.5 3, y ranks 1 2 3 -> Pearson of the ranks
    rx, ry = np.array([1.5, 1.5, 3.0]), np.array([1.0, 2.0, 3.0])
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def _row(k, epochs, knn, stability, chance, rankme=10.0):
    return {"k": k, "epochs": epochs, "knn": knn, "nmi": knn / 2, "acc": None, "rankme": rankme,
            "stability": stability, "nmi_chance": chance, "nmi_prev": None}


def test_proxy_correlations_views():
    from deepcluster.sweep_track import correlations_markdown, proxy_correlations

    # k = 10: kNN rises with the epochs and so does stability; k = 100: kNN rises, stability falls.
    # Across k at the last epoch (3): k = 10 has the higher kNN but the lower stability - chance.
    rows = [_row(10, 1, 0.70, 0.50, 0.0), _row(10, 2, 0.72, 0.60, 0.0), _row(10, 3, 0.74, 0.70, 0.0),
            _row(100, 1, 0.60, 0.95, 0.1), _row(100, 2, 0.65, 0.90, 0.1), _row(100, 3, 0.69, 0.85, 0.1),
            _row(300, 3, 0.50, 0.90, 0.6)]
    corr = proxy_correlations(rows)
    assert corr["points"] == {"pooled": 7, "across_k": 3, "within_run": {10: 3, 100: 3, 300: 1}}
    # within a run: +1 for k = 10, -1 for k = 100 (k = 300 has one point): mean 0
    assert corr["within_run"]["stability"]["knn"] == pytest.approx(0.0)
    # across k, last epochs: kNN 0.74 > 0.69 > 0.50; stability - chance 0.70, 0.75, 0.30 -> ranks 2 3 1 vs 3 2 1
    assert corr["across_k"]["stability_excess"]["knn"] == pytest.approx(0.5)
    assert corr["across_k"]["stability"]["knn"] == pytest.approx(-1.0)  # raw: 0.70, 0.85, 0.90, reversed
    # pooled over all 7 points, against scipy on the same pairs
    from scipy.stats import spearmanr

    x = [r["stability"] - r["nmi_chance"] for r in rows]
    assert corr["pooled"]["stability_excess"]["nmi"] == pytest.approx(spearmanr(x, [r["knn"] for r in rows])[0])
    assert corr["pooled"]["rankme"]["knn"] is None  # a constant signal
    assert corr["pooled"]["nmi_prev"]["acc"] is None  # no values
    md = correlations_markdown(corr)
    assert "all points (n = 7): kNN" in md and "| stability − chance | " in md and "+0.50" in md


def test_track_scores_every_kept_epoch(tiny_mnist_root, tmp_path):
    """``--track``: each snapshot is scored as the sweep scores the last epoch, a second call
    measures nothing again, and the correlation table is written."""
    from deepcluster.sweep import evaluate_member
    from deepcluster.sweep_track import track_epochs

    out = tmp_path / "sweep"
    overrides = {**tiny_overrides(tiny_mnist_root), "run": {"workers": 0, "keep_every": 1}}
    (last,) = run_sweep(overrides, [5], EPOCHS, out, track=True)
    tracked = json.loads((out / "sweep-epochs.json").read_text())
    rows = tracked["rows"]
    assert [(r["k"], r["epochs"]) for r in rows] == [(5, 1), (5, 2)]
    assert {key: rows[1][key] for key in ("knn", "nmi", "rankme", "stability", "nmi_prev")} == \
        {key: last[key] for key in ("knn", "nmi", "rankme", "stability", "nmi_prev")}
    recs, hist = records(out / "k5"), np.load(out / "k5" / "assignments.npy")
    first = rows[0]
    assert first["rankme"] == pytest.approx(recs[0]["rankme"]) and first["nmi_prev"] is None
    sizes = np.bincount(hist[0], minlength=5)  # the snapshot's epoch, not the last
    assert (first["size_min"], first["size_max"]) == (sizes.min(), sizes.max())
    assert first["minutes"] == pytest.approx(recs[0]["epoch_s"] / 60)
    again = evaluate_member(out / "k5", epoch=1)
    assert (again["knn"], again["stability"]) == (first["knn"], first["stability"])
    md = (out / "sweep-epochs.md").read_text()
    assert "Spearman rank correlation" in md and "| 5 | 1 | " in md and "| 5 | 2 | " in md
    stamp = (out / "sweep-epochs.json").stat().st_mtime_ns
    snap = (out / "k5" / "checkpoint-epoch1.pt").stat().st_mtime_ns
    assert track_epochs(out)["rows"] == rows  # read back, not measured again
    assert (out / "k5" / "checkpoint-epoch1.pt").stat().st_mtime_ns == snap
    assert (out / "sweep-epochs.json").stat().st_mtime_ns >= stamp
