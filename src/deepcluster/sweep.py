"""The k sweep (the paper's Figure 3): one DeepCluster run per number of clusters k,
each evaluated with and without labels, summarised in one table and one figure.

Caron et al. (2018, section 5.1, Figure 3) train with k from 1,000 to 30,000 on ImageNet
and plot the transfer quality against k on a log axis: some over-segmentation helps.
:func:`run_sweep` repeats that experiment on any data set::

    from deepcluster.sweep import run_sweep
    rows = run_sweep({"data": {"subset": 5000}}, [10, 30, 100], epochs=6, out_dir="sweeps/fmnist",
                     preset="small-images")

Layout of ``out_dir``: one run folder per k (``k10/``, ``k30/``, ... — each a complete
``deepcluster train`` run folder), and ``sweep.json``, ``sweep.md``, ``sweep.png``
(rewritten atomically after every member, so an interrupted sweep has a partial table).

A sweep is resumable: a member whose checkpoint has the requested epochs is not trained
again (and its evaluation, keyed by its checkpoint, is reused); an unfinished one is
resumed like ``deepcluster train --resume`` (its ``config.yaml`` the base, the sweep's
settings over it). Each member is scored by

- labelled metrics (skipped, and said so, when the data set has no labels): the k-NN
  probe of :func:`deepcluster.eval.knn_eval` and k-means NMI / ACC at the number of
  classes of :func:`deepcluster.eval.clusters_eval`, on the test split;
- label-free signals, to choose k on unlabelled data: RankMe of the last epoch (from
  ``metrics.jsonl``), cluster stability across k-means seeds at the run's k on the
  PCA-whitened features its last epoch clustered
  (:func:`deepcluster.labelfree.cluster_stability`), NMI between the last two epochs'
  assignments (``nmi_prev``), and the cluster sizes of the last epoch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, ConfigError, merge, resolve

logger = logging.getLogger(__name__)

SUMMARY_FILES = ("sweep.json", "sweep.md", "sweep.png")
STABILITY_SEEDS = (0, 1, 2)
"""k-means seeds of the stability signal (three pairs of clusterings)."""
CHANCE_DRAWS = 3
"""Random relabellings averaged by the chance level of NMI (:func:`chance_nmi`)."""
ROW_VERSION = 2
"""Bumped when a row gains or changes a field: rows of an older sweep.json are measured again."""


class SweepError(ConfigError):
    """A sweep cannot run as asked (bad list of k, a member folder that does not fit)."""


# ---------------------------------------------------------------------- the list of k

def parse_ks(text: str) -> list[int]:
    """``"30,100,300"`` -> ``[30, 100, 300]``; see :func:`check_ks` for the rules.

    Raises:
        SweepError: an empty list, an item that is not an integer, k < 1 or a repeat.
    """
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise SweepError("--k: give a comma-separated list of cluster counts, e.g. --k 30,100,300")
    ks = []
    for t in items:
        try:
            ks.append(int(t))
        except ValueError:
            raise SweepError(f"--k: {t!r} is not an integer (give e.g. --k 30,100,300)") from None
    return check_ks(ks)


def check_ks(ks: Sequence[int]) -> list[int]:
    """The values of k, sorted; each ``>= 1``, no repeats, at least one.

    Raises:
        SweepError: the list breaks a rule (the message names the value).
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise SweepError("--k: the list of cluster counts is empty; give e.g. --k 30,100,300")
    bad = [k for k in ks if k < 1]
    if bad:
        raise SweepError(f"--k: every number of clusters must be >= 1, got {bad[0]}")
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        raise SweepError(f"--k: {repeated[0]} is listed more than once")
    return sorted(ks)


def member_dir(out_dir: str | Path, k: int) -> Path:
    """The run folder of the member with ``k`` clusters: ``OUT/k<k>``."""
    return Path(out_dir) / f"k{k}"


# ---------------------------------------------------------------------- configs and plan

def member_config(base_overrides: dict[str, dict[str, Any]], k: int, epochs: int | None, out_dir: str | Path,
                  preset: str | None = None, config_file: str | Path | None = None) -> Config:
    """The configuration ``deepcluster train`` would resolve for the member with ``k``.

    Defaults <- ``preset`` <- ``config_file`` <- ``base_overrides`` <- (k, epochs, output
    folder, resume). A member that has started (its ``config.yaml`` exists) is resumed as
    ``deepcluster train --resume`` resumes: its own ``config.yaml`` replaces
    ``config_file`` as the base.
    """
    run = member_dir(out_dir, k)
    started = (run / "config.yaml").is_file() or (run / "checkpoint.pt").is_file()
    own = {"cluster": {"k": int(k)}, "run": {"output_dir": str(run), "resume": started}}
    if epochs is not None:
        own["optim"] = {"epochs": int(epochs)}
    file = run / "config.yaml" if (run / "config.yaml").is_file() else config_file
    return resolve(preset, file, merge(base_overrides, own))


def checkpoint_epoch(run: Path) -> int:
    """Epochs completed by the run in ``run`` (0 without a checkpoint)."""
    from .checkpoint import load_checkpoint

    path = run / "checkpoint.pt"
    return int(load_checkpoint(path).get("epoch") or 0) if path.is_file() else 0


def _check_plan(cfgs: dict[int, Config]) -> dict[int, int]:
    """Refuse, before any work, what cannot run; returns each member's completed epochs.

    Raises:
        SweepError: PIC (no k), a k above the number of images, a member with more epochs
            than asked.
    """
    from .data import training_source

    first = next(iter(cfgs.values()))
    if first.cluster.method != "kmeans":
        raise SweepError(f"a sweep varies k-means' k; --clustering {first.cluster.method} has no k (use kmeans)")
    n = len(training_source(first.data, first.run.seed))
    too_big = [k for k in cfgs if k > n]
    if too_big:
        raise SweepError(f"--k {too_big[0]} is larger than the number of images ({n}); lower it")
    done = {k: checkpoint_epoch(Path(cfg.run.output_dir)) for k, cfg in cfgs.items()}
    for k, cfg in cfgs.items():
        if done[k] > cfg.optim.epochs:
            raise SweepError(f"{cfg.run.output_dir} has {done[k]} epochs, more than --epochs {cfg.optim.epochs}; "
                             f"ask for --epochs {done[k]} or another --output-dir")
    return done


# ---------------------------------------------------------------------- one member

def chance_nmi(assignments: np.ndarray, draws: int = CHANCE_DRAWS, seed: int = 0) -> float:
    """NMI of ``assignments`` ``(N,)`` with random relabellings of itself (the same cluster
    sizes, images shuffled), averaged over ``draws``: what NMI between two partitions
    with these sizes gives by chance alone.

    Unadjusted NMI grows with k for unrelated partitions (two random balanced partitions of
    5,000 images into 300 clusters have NMI 0.51), so ``stability`` and ``nmi_prev`` of
    different k are compared through their distance from this level.
    """
    from .metrics import nmi

    rng = np.random.default_rng(seed)
    return float(np.mean([nmi(assignments, rng.permutation(assignments)) for _ in range(draws)]))


def _label_free_signals(run: Any, last: dict[str, Any], batch_size: int, workers: int) -> dict[str, Any]:
    """Label-free signals of a loaded run (:class:`deepcluster.rundir.Run`) at the epoch
    of its checkpoint, whose ``metrics.jsonl`` record is ``last``."""
    from .export import run_features
    from .labelfree import cluster_stability

    k = int(run.config.cluster.k)
    t0 = time.perf_counter()
    _, _, z = run_features(run, "pca", batch_size, workers)  # (N, pca_dim): what the last epoch clustered
    stability = cluster_stability(z, k, STABILITY_SEEDS, niter=run.config.cluster.niter)
    sizes = np.bincount(run.last_assignments, minlength=k)
    return {"rankme": last.get("rankme"), "stability": stability, "nmi_prev": last.get("nmi_prev"),
            "nmi_chance": chance_nmi(run.last_assignments),
            "size_min": int(sizes.min()), "size_median": float(np.median(sizes)), "size_max": int(sizes.max()),
            "empty_clusters": int((sizes == 0).sum()), "stability_s": time.perf_counter() - t0}


def _labelled_scores(checkpoint: Path, cfg: Config, eval_subset: int | None,
                     eval_test_subset: int | None) -> dict[str, Any]:
    """k-NN top-1 and k-means NMI / ACC at the number of classes; ``None`` with a note
    when the data set has no labels."""
    from .data import DataError
    from .eval import clusters_eval, knn_eval, open_checkpoint

    skipped = {"knn": None, "nmi": None, "acc": None, "labelled": False,
               "eval_note": "no labels: k-NN, NMI and ACC not measured"}
    if cfg.data.labels == "none":  # the folder's sub-folders are not classes
        logger.warning("%s: k-NN and k-means NMI/ACC skipped: trained with --labels none", checkpoint.parent)
        return skipped
    try:
        ctx = open_checkpoint(checkpoint, protocol="sweep", subset=eval_subset, test_subset=eval_test_subset,
                              device=cfg.run.device, batch_size=cfg.optim.batch_size, workers=cfg.run.workers)
    except DataError as e:
        if "needs labels" not in str(e):
            raise
        logger.warning("%s: k-NN and k-means NMI/ACC skipped: the data set has no labels", checkpoint.parent)
        return skipped
    knn = knn_eval(ctx)["metrics"]
    clusters = clusters_eval(ctx)["metrics"]
    return {"knn": knn["knn"], "nmi": clusters["nmi"], "acc": clusters["acc"], "labelled": True,
            "num_classes": ctx.data.num_classes, "eval_test_images": len(ctx.data.test)}


def checkpoint_key(checkpoint: Path, eval_subset: int | None, eval_test_subset: int | None) -> str:
    """What a stored row was measured on: the checkpoint file by size and modification
    time, and the evaluation subsets."""
    st = checkpoint.stat()
    return f"v{ROW_VERSION}|{st.st_size}|{st.st_mtime_ns}|{eval_subset}|{eval_test_subset}"


def evaluate_member(run_dir: str | Path, eval_subset: int | None = None,
                    eval_test_subset: int | None = None, epoch: int | None = None) -> dict[str, Any]:
    """The sweep's row of one trained run: k, epochs, training minutes, the labelled
    scores (``knn``, ``nmi``, ``acc``; ``None`` without labels) and the label-free signals
    (``rankme``, ``stability``, ``nmi_prev``, ``size_min`` / ``size_median`` / ``size_max``).

    Args:
        run_dir: a ``deepcluster train`` run folder.
        eval_subset, eval_test_subset: fixed random subsets of the training split (the
            k-NN reference set) and of the test split for the labelled scores (``None``: all).
        epoch: score the run as it was after this many epochs (its snapshot
            ``checkpoint-epochE.pt``, kept with ``--keep-every``); ``None``: the last.
    """
    from .rundir import Run, RunDir

    run_dir = Path(run_dir)
    checkpoint = RunDir(run_dir).checkpoint_for(epoch)
    t0 = time.perf_counter()
    run = Run.load(checkpoint)
    cfg = run.config
    done = int(run.state.get("epoch") or 0)
    records = [r for r in run.records if r["epoch"] < done]  # metrics.jsonl has the epochs after a snapshot too
    row: dict[str, Any] = {"k": int(cfg.cluster.k), "epochs": done,
                           "minutes": sum(r.get("epoch_s") or 0.0 for r in records) / 60.0,
                           "num_images": len(run.last_assignments), "run": str(run_dir)}
    row.update(_labelled_scores(checkpoint, cfg, eval_subset, eval_test_subset))
    row.update(_label_free_signals(run, records[-1] if records else {}, cfg.optim.batch_size, cfg.run.workers))
    row["eval_s"] = time.perf_counter() - t0
    row["checkpoint_key"] = checkpoint_key(checkpoint, eval_subset, eval_test_subset)
    return row


# ---------------------------------------------------------------------- the sweep

def _previous_rows(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Rows of an earlier ``sweep.json`` in ``out_dir``, by k (none when absent or unreadable)."""
    try:
        return {int(r["k"]): r for r in json.loads((out_dir / "sweep.json").read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_sweep(base_overrides: dict[str, dict[str, Any]], ks: Sequence[int], epochs: int | None,
              out_dir: str | Path, preset: str | None = None, config_file: str | Path | None = None,
              eval_subset: int | None = None, eval_test_subset: int | None = None,
              track: bool = False) -> list[dict[str, Any]]:
    """Train (or resume) one run per k in turn, evaluate each, write the summary.

    Args:
        base_overrides: config overrides shared by every member (``{"data": {...}, ...}``,
            what ``deepcluster train``'s flags give); ``cluster.k`` and
            ``run.output_dir`` are the sweep's own.
        ks: the numbers of clusters, each ``>= 1`` and at most the number of images.
        epochs: epochs of every member (``None``: the preset's / config file's).
        out_dir: the sweep folder (one run folder ``k<k>`` per member, and the summary).
        preset, config_file: as ``deepcluster train --preset / --config``.
        eval_subset, eval_test_subset: see :func:`evaluate_member`.
        track: then also score every snapshot the members kept (``run.keep_every``) and
            measure how well the label-free signals track the labelled scores
            (:func:`deepcluster.sweep_track.track_epochs`: ``sweep-epochs.json``,
            ``sweep-epochs.md``).

    Returns:
        One row per k (ascending), as in ``sweep.json``.

    Raises:
        SweepError: bad ``ks``, PIC, k above the data's size, a member with more epochs than
            asked; all checked before any training.
    """
    from .monitor import default_callbacks
    from .train import train

    out_dir = Path(out_dir)
    ks = check_ks(ks)
    own = (("cluster", "k"), ("run", "output_dir"))  # set per member
    base = {section: {key: value for key, value in values.items() if (section, key) not in own}
            for section, values in base_overrides.items()}
    cfgs = {k: member_config(base, k, epochs, out_dir, preset, config_file) for k in ks}
    done = _check_plan(cfgs)
    previous = _previous_rows(out_dir)
    rows: list[dict[str, Any]] = []
    for k, cfg in cfgs.items():
        if done[k] < cfg.optim.epochs:
            logger.info("sweep: k=%d, %s at epoch %d of %d", k, "resuming" if done[k] else "training", done[k],
                        cfg.optim.epochs)
            train(cfg, callbacks=default_callbacks(cfg))
        else:
            logger.info("sweep: k=%d already has its %d epochs; not trained again", k, cfg.optim.epochs)
        run = member_dir(out_dir, k)
        old = previous.get(k)
        if old is not None and old.get("checkpoint_key") == checkpoint_key(run / "checkpoint.pt", eval_subset,
                                                                           eval_test_subset):
            rows.append(old)
        else:
            rows.append(evaluate_member(run, eval_subset, eval_test_subset))
        summarise(rows, out_dir, settings={"ks": ks, "epochs": cfg.optim.epochs, "preset": cfg.preset,
                                           "overrides": base, "eval_subset": eval_subset,
                                           "eval_test_subset": eval_test_subset})
    if track:
        from .sweep_track import track_epochs

        track_epochs(out_dir, ks, eval_subset, eval_test_subset)
    return rows


# ---------------------------------------------------------------------- the summary

COLUMNS: tuple[tuple[str, str], ...] = (
    ("k", "k"), ("epochs", "epochs"), ("minutes", "minutes"), ("knn", "kNN"), ("nmi", "NMI"), ("acc", "ACC"),
    ("rankme", "RankMe"), ("stability", "stability"), ("nmi_prev", "NMI-prev"),
    ("nmi_chance", "chance NMI"), ("sizes", "sizes min/med/max"),
)
"""(row key, header) of the table's columns."""


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "sizes":
        return f"{row['size_min']}/{row['size_median']:g}/{row['size_max']}"
    value = row.get(key)
    if value is None:
        return "—"
    if key in ("k", "epochs"):
        return str(int(value))
    if key == "minutes":
        return f"{value:.1f}"
    if key in ("knn", "acc"):
        return f"{100 * value:.1f} %"
    return f"{value:.1f}" if key == "rankme" else f"{value:.3f}"


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Header, rule and one line per row (in the order given) of the sweep's columns."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(_cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a Markdown table, one line per k (ascending), and a note on what was
    not measured."""
    lines = table_lines(sorted(rows, key=lambda r: r["k"]))
    notes = sorted({r["eval_note"] for r in rows if r.get("eval_note")})
    return "\n".join(lines + [""] + [f"Note: {n}." for n in notes]).rstrip() + "\n"


def summarise(rows: Sequence[dict[str, Any]], out_dir: str | Path,
              settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``sweep.json`` (settings, machine, rows), ``sweep.md`` (the table) and
    ``sweep.png`` (each metric against k, log axis) into ``out_dir``, atomically.

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    from .io import write_text
    from .machine import machine_info
    from .viz.curves import save_figure
    from .viz.sweep import plot_sweep

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["k"])
    paths = {ext: out_dir / f"sweep.{ext}" for ext in ("json", "md", "png")}
    payload = {"settings": settings or {}, "machine": machine_info(), "rows": list(rows)}
    write_text(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    intro = (f"# k sweep: {out_dir}\n\nkNN: k-NN top-1 on the test split; NMI, ACC: k-means at the number of "
             "classes on the test split; RankMe, NMI-prev (between the last two epochs), sizes: the last epoch "
             "(metrics.jsonl); stability: mean NMI between k-means runs at the run's k with seeds "
             f"{', '.join(map(str, STABILITY_SEEDS))} on the features its last epoch clustered; chance NMI: NMI of "
             "the last epoch's clusters with shuffled copies of themselves (what stability and NMI-prev give by "
             "chance at these cluster sizes); minutes: training.\n\n")
    write_text(paths["md"], intro + table_markdown(rows))
    save_figure(plot_sweep(rows, title=f"DeepCluster k sweep ({out_dir.name})"), paths["png"])
    return paths
