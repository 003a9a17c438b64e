"""The run report: one static HTML page with the paper's figures for a run.

``build_report(run_dir)`` writes ``RUN_DIR/report/index.html`` and, beside it, one PNG
per figure (relative links, no script, no server: the page opens from disk):

1. training curves: NMI vs labels and between consecutive epochs, losses, cluster
   sizes, time per phase (the paper's Figure 2 a/b);
2. the cluster-size histogram of the last epoch (appendix Figure 3);
3. first-layer filters (Figure 3);
4. top-9 activating images of a sample of filters of one layer (Figures 4, 5, 7);
5. images synthesised by gradient ascent for the same filters (Figure 4's method);
6. nearest-neighbour queries, random network vs trained (appendix Figure 2);
7. contact sheets of the largest, smallest and random clusters, with purity.

It is built to be quick: the image-based figures use one forward pass of the trained
network (and one of a random one) over a random sample of the images (5,000 by
default), gradient ascent is capped, and contact sheets load only the images they show.
"""

from __future__ import annotations

import html
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write
from .viz import curves
from .viz.activations import check_layer, forward_pass, pick_filters, plot_top_images, top_activating
from .viz.clusters import cluster_members, cluster_title, contact_sheet, pick_clusters, plot_contact_sheet
from .viz.filters import plot_filters
from .viz.images import run_display, save_png
from .viz.neighbors import nearest_neighbors, neighbor_label_agreement, plot_neighbors
from .rundir import CHECKPOINT, Run, RunDir, checkpoint_path, ensure_writable_dir, sample_indices
from .viz.synthesis import plot_synthesis, synthesis_display, synthesize

logger = logging.getLogger(__name__)

# Largest sample tensor the report builds (bytes): 5,000 images at 28 px, fewer for big images.
MAX_SAMPLE_BYTES = 400 * 2**20


@dataclass
class ReportOptions:
    """What the report computes.

    Attributes:
        layer: conv layer of the top-image and synthesis figures.
        sample: images in the random sample used for top images and neighbours.
        num_filters: filters shown in the top-image and synthesis figures.
        top_k: top-activating images per filter.
        synth_steps: gradient-ascent steps (capped for speed).
        queries: nearest-neighbour query images.
        neighbors: neighbours per query (for each of the two networks).
        largest, smallest, random_clusters: clusters given a contact sheet.
        per_cluster: images per contact sheet.
        seed: seeds every random choice of the report.
    """

    layer: str = "conv5"
    sample: int = 5000
    num_filters: int = 8
    top_k: int = 9
    synth_steps: int = 200
    queries: int = 6
    neighbors: int = 4
    largest: int = 3
    smallest: int = 3
    random_clusters: int = 3
    per_cluster: int = 32
    seed: int = 0


@dataclass
class Figure_:
    file: str
    caption: str
    alt: str
    wide: bool = False


@dataclass
class Section:
    key: str
    title: str
    intro: str = ""
    figures: list[Figure_] | None = None
    note: str = ""
    html_extra: str = ""


def _save(fig_or_array, path: Path, scale: int = 1) -> None:
    if isinstance(fig_or_array, np.ndarray):
        save_png(fig_or_array, path, scale=scale)
    else:
        curves.save_figure(fig_or_array, path)


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.parts[name] = time.perf_counter() - t
            logger.info("report: %s in %.1fs", name, self.parts[name])


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, options: ReportOptions | None = None,
                 epoch: int | str | None = None,
                 device: str = "cpu") -> Path:
    """Write the report of ``run_dir``; returns the path of ``index.html``.

    Args:
        run_dir: a ``deepcluster train`` output directory (``metrics.jsonl`` needed;
            without ``checkpoint.pt`` only the curves are drawn).
        out_dir: where to write (default ``RUN_DIR/report``).
        options: what to compute (see :class:`ReportOptions`).
        device: where the network runs.

    Raises:
        ValueError: no metrics, a layer that does not exist, an output directory that
            cannot be written.
    """
    opt = options or ReportOptions()
    run_dir = Path(run_dir)
    records = RunDir(run_dir).read_metrics(required=True)
    run: Run | None = None
    if (run_dir / CHECKPOINT).is_file():  # refusals (a changed folder, a bad layer) before any folder is made
        run = Run.load(checkpoint_path(run_dir, epoch), require_metrics=True, device=device)
        check_layer(run.model, opt.layer)
        run.source  # noqa: B018 - opens the data, checking the folder's manifest
    out = ensure_writable_dir(out_dir if out_dir is not None else run_dir / "report")
    timer = _Timer()
    sections: list[Section] = []
    assignments = run.assignments if run is not None else RunDir(run_dir).read_assignments()

    sections.append(timer.section("curves", lambda: _curves_section(records, out)))
    if assignments is not None and len(assignments):
        sections.append(timer.section("histogram", lambda: _histogram_section(assignments[-1], out)))
    if run is None:
        sections.append(Section("model", "Network figures",
                                note=f"{run_dir / CHECKPOINT} does not exist, so the figures that need the trained "
                                     "network (filters, top images, synthesis, neighbours, clusters) are skipped."))
    else:
        sections.append(timer.section("filters", lambda: _filters_section(run, out)))
        sample = timer.section("forward pass", lambda: sample_pass(run, opt))
        filters = pick_filters(sample["scores"], opt.num_filters, opt.seed)
        sections.append(timer.section("top images", lambda: _top_section(run, opt, sample, filters, out)))
        sections.append(timer.section("synthesis", lambda: _synthesis_section(run, opt, filters, out)))
        sections.append(timer.section("neighbours", lambda: _neighbors_section(run, opt, sample, out)))
        sections.append(timer.section("clusters", lambda: _clusters_section(run, opt, out)))

    config = _config_of(run, run_dir)
    page = render_html(run_dir, records, config, sections, opt, time.perf_counter() - timer.t0, timer.parts)
    index = out / "index.html"
    atomic_write(index, lambda f: f.write(page.encode("utf-8")))
    logger.info("report written to %s (%.1fs)", index, time.perf_counter() - timer.t0)
    return index


# --------------------------------------------------------------------------- sections

def _curves_section(records: list[dict[str, Any]], out: Path) -> Section:
    figs = []
    has_labels = any(r.get("nmi_labels") is not None for r in records)
    _save(curves.plot_nmi(records), out / "nmi.png")
    figs.append(Figure_("nmi.png", (
        "NMI between the clusters and the true labels (labels are never used for training) and between the "
        "clusters of consecutive epochs. The first should rise as the features become semantic; the second "
        "measures stability and rises as assignments settle (the paper sees it saturate below 0.8 on ImageNet: "
        "some images keep moving between clusters)." if has_labels else
        "NMI between the clusters of consecutive epochs: stability of the assignments. The data set has no "
        "labels, so NMI against labels is not available."), "NMI over epochs"))
    _save(curves.plot_losses(records), out / "losses.png")
    figs.append(Figure_("losses.png", (
        "Left: cross-entropy of the network on its pseudo-labels, averaged over the epoch (it starts near "
        "log k because the head is new every epoch). Right: k-means loss in the PCA-whitened, L2-normalised "
        "space; it falls when features form tighter clusters."), "losses"))
    _save(curves.plot_cluster_sizes(records), out / "sizes.png")
    figs.append(Figure_("sizes.png", (
        "Smallest, median and largest cluster per epoch (log scale). A largest cluster that swallows much of "
        "the data set, or many tiny ones, signals a degenerate clustering; the uniform sampling over clusters "
        "keeps training balanced regardless."), "cluster sizes over epochs"))
    _save(curves.plot_timings(records), out / "timings.png")
    figs.append(Figure_("timings.png", (
        "Seconds spent per epoch in feature extraction, PCA, clustering and training. On ImageNet the paper "
        "spends about a third of the time in k-means."), "time per phase"))
    return Section("curves", "Training curves", "From metrics.jsonl, one point per epoch (the paper's Figure 2 a/b).",
                   figs)


def _histogram_section(last: np.ndarray, out: Path) -> Section:
    sizes = np.bincount(np.asarray(last, dtype=np.int64))
    _save(curves.plot_size_histogram(sizes), out / "size_histogram.png")
    return Section("histogram", "Cluster sizes at the last epoch", "", [Figure_("size_histogram.png", (
        f"How many clusters have how many images ({len(sizes)} clusters, {int(sizes.sum()):,} images, sizes "
        f"{int(sizes.min())}–{int(sizes.max())}). k-means gives fairly even sizes; PIC gives very uneven ones "
        "(the paper's appendix Figure 3)."), "histogram of cluster sizes")])


def _filters_section(run: Run, out: Path) -> Section:
    from .models import Sobel

    sobel = isinstance(run.model.sobel, Sobel)
    _save(plot_filters(run.model), out / "filters.png")
    what = ("The network sees Sobel gradients, so each filter is shown as its effective kernel on the grey image "
            "(conv1 composed with the fixed Sobel filters). Trained filters look like oriented edge and "
            "line detectors at several frequencies." if sobel else
            "Raw-RGB input: each filter's weights shown in colour. The paper finds that many raw-RGB filters "
            "capture only colour, which is why it removes colour with the Sobel front end.")
    return Section("filters", "First-layer filters", "", [Figure_("filters.png", (
        f"All {run.model.features[0].out_channels} filters of conv1, each scaled on its own (grey = 0). " + what
        + " (the paper's Figure 3)"), "first-layer filters")])


def _sample_size(run: Run, requested: int) -> int:
    s = run.spec.size
    return max(16, min(requested, MAX_SAMPLE_BYTES // (3 * s * s * 4)))


def sample_pass(run: Run, opt: ReportOptions, random_network: bool = True) -> dict[str, Any]:
    """Load a random sample of the run's images and pass it through the trained network
    (features and ``opt.layer``'s filter responses) and a random one (features).

    Returns a dict: ``indices`` (n,), ``x`` (n, 3, S, S), ``features`` (n, fc_dim),
    ``scores`` (n, C_layer), ``random_features`` (n, fc_dim) or None, ``labels`` (n,) or None.
    """
    n = len(run.source)
    idx = sample_indices(n, _sample_size(run, opt.sample), opt.seed)
    x = run.load_images(idx)
    trained = forward_pass(run.model, x, [opt.layer])
    rand = forward_pass(run.random_model(opt.seed), x, []) if random_network else None
    labels = run.labels[idx] if run.labels is not None else None
    return {"indices": idx, "x": x, "features": trained.features, "scores": trained.scores[opt.layer],
            "random_features": None if rand is None else rand.features, "labels": labels}


def _top_section(run: Run, opt: ReportOptions, sample: dict[str, Any], filters: list[int], out: Path) -> Section:
    top = top_activating(sample["scores"], filters, opt.top_k)
    rows = np.unique(top)
    disp = np.zeros((len(sample["x"]),) + tuple(sample["x"].shape[2:]) + (3,))
    disp[rows] = run_display(run, sample["x"][rows])
    _save(plot_top_images(disp, top, filters, opt.layer), out / "top_images.png")
    return Section("top", f"Top-{opt.top_k} activating images ({opt.layer})", "", [Figure_("top_images.png", (
        f"For {len(filters)} random live filters of {opt.layer}, the {opt.top_k} images of a random sample of "
        f"{len(sample['x']):,} that excite the filter most (maximum of its activation map). Deep layers of a "
        "good network respond to object parts and classes, so each tile should look coherent "
        "(the paper's Figures 4, 5, 7)."), f"top activating images of {opt.layer}", wide=True)])


def _synthesis_section(run: Run, opt: ReportOptions, filters: list[int], out: Path) -> Section:
    from .models import Sobel

    # A batch of a few small images is latency-bound: one thread is as fast, and far
    # faster than several on a busy machine (thread hand-offs dominate).
    threads = torch.get_num_threads()
    if run.model.image_size <= 64:
        torch.set_num_threads(1)
    try:
        x = synthesize(run.model, opt.layer, filters, run.spec.mean, run.spec.std, steps=opt.synth_steps,
                       seed=opt.seed)
    finally:
        torch.set_num_threads(threads)
    disp = synthesis_display(x, grey=isinstance(run.model.sobel, Sobel))
    _save(plot_synthesis(disp, filters, opt.layer), out / "synthesis.png")
    return Section("synthesis", f"Filters synthesised by gradient ascent ({opt.layer})", "", [Figure_(
        "synthesis.png", (
            f"The same filters: an image grown from noise by {opt.synth_steps} steps of gradient ascent on the "
            "filter's mean activation, as a softmax against the other filters of the layer (so it excites "
            "this filter more than the others), with weight decay and a blur every few steps "
            "(the paper's Figure 4 method). Compare with the top images above."), "synthesised images", wide=True)])


def _neighbors_section(run: Run, opt: ReportOptions, sample: dict[str, Any], out: Path) -> Section:
    rng = np.random.default_rng(opt.seed + 1)
    n = len(sample["x"])
    queries = np.sort(rng.choice(n, min(opt.queries, n), replace=False))
    k = min(opt.neighbors, n - 1)
    nn_t = nearest_neighbors(sample["features"], queries, k)
    nn_r = nearest_neighbors(sample["random_features"], queries, k)
    rows = np.unique(np.concatenate([queries, nn_t.ravel(), nn_r.ravel()]))
    disp = np.zeros((n,) + tuple(sample["x"].shape[2:]) + (3,))
    disp[rows] = run_display(run, sample["x"][rows])
    labels = sample["labels"]
    _save(plot_neighbors(disp, queries, nn_r, nn_t, labels, run.class_names), out / "neighbors.png")
    caption = (f"Each row: a query image from the sample, its {k} nearest neighbours (cosine similarity of the "
               f"fc7 features, among {n:,} images) under a randomly initialised network of the same architecture, "
               "then under the trained network (the paper's appendix Figure 2).")
    if labels is not None:
        kk = min(10, n - 1)
        a_r = neighbor_label_agreement(sample["random_features"], labels, kk, seed=opt.seed)
        a_t = neighbor_label_agreement(sample["features"], labels, kk, seed=opt.seed)
        chance = float(np.sum((np.bincount(labels) / len(labels)) ** 2))
        caption += (f" Green frame: same label as the query, red: different. Over {min(2000, n):,} queries, "
                    f"{a_r:.1%} of the {kk} nearest neighbours share the query's label with the random network "
                    f"and {a_t:.1%} with the trained one (chance {chance:.1%}).")
    return Section("neighbors", "Nearest neighbours: random vs trained", "",
                   [Figure_("neighbors.png", caption, "nearest-neighbour queries", wide=True)])


def _clusters_section(run: Run, opt: ReportOptions, out: Path) -> Section:
    last = run.last_assignments
    labels = run.labels
    picks = pick_clusters(last, opt.largest, opt.smallest, opt.random_clusters, opt.seed, labels)
    tf_cache: dict[int, np.ndarray] = {}

    def load(i: int) -> np.ndarray:
        if i not in tf_cache:
            tf_cache[i] = run_display(run, run.load_images(np.array([i])))[0]
        return tf_cache[i]

    figs = []
    for p in picks:
        members = cluster_members(last, p.cluster, opt.per_cluster, opt.seed)
        sheet = contact_sheet(load, members, ncols=8)
        name = f"cluster_{p.cluster:05d}.png"
        _save(plot_contact_sheet(sheet, cluster_title(p, run.class_names)), out / name)
        cap = f"{len(members)} random members of cluster {p.cluster}, one of the {p.kind} ({p.size:,} images)."
        if p.purity is not None:
            cap += f" Purity {p.purity:.2f}: the share of its images in its most common class."
        figs.append(Figure_(name, cap, f"cluster {p.cluster}"))
    intro = ("Clusters of the last epoch: the largest, the smallest and random ones. Pure clusters group one "
             "kind of object; mixed clusters show what the features confuse.")
    if labels is not None:
        from .metrics import cluster_purity

        pur = cluster_purity(last, labels)
        sizes = np.bincount(last)[np.unique(last)]
        intro += (f" Mean purity over all {len(pur)} clusters: {float(pur.mean()):.2f} "
                  f"(weighted by size: {float((pur * sizes).sum() / sizes.sum()):.2f}).")
    return Section("clusters", "Clusters", intro, figs)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 18px; }
.grid.small { grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); }
figure { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 10px; }
figure img { width: 100%; height: auto; display: block; image-rendering: auto; }
figure.wide { grid-column: 1 / -1; } figure.wide img { max-width: 1100px; margin: 0 auto; }
figure img.broken { outline: 3px solid #d62728; min-height: 40px; }
figcaption { font-size: 13px; color: #444; margin-top: 8px; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
td, th { border: 1px solid #e3e3e3; padding: 3px 8px; text-align: left; }
th { background: #f1f1f1; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.tables > div:last-child { flex: 1; min-width: 420px; }
table.config td:last-child { line-height: 1.7; } table.config b { font-weight: 600; color: #555; }
.note { background: #fff8e1; border: 1px solid #f0d98c; padding: 8px 12px; border-radius: 4px; }
footer { color: #888; font-size: 12px; margin-top: 40px; }
"""

METRIC_LABELS = [
    ("nmi_labels", "NMI vs labels"), ("nmi_prev", "NMI vs previous epoch"), ("convnet_loss", "convnet loss"),
    ("clustering_loss", "clustering loss"), ("num_clusters", "clusters"), ("cluster_size_min", "smallest cluster"),
    ("cluster_size_median", "median cluster"), ("cluster_size_max", "largest cluster"),
    ("empty_clusters", "empty clusters"), ("empty_reseeded", "empty clusters re-seeded"),
    ("extract_s", "extract (s)"), ("pca_s", "PCA (s)"), ("kmeans_s", "clustering (s)"), ("train_s", "train (s)"),
    ("epoch_s", "epoch (s)"), ("images_per_s", "training images/s"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 0.01:  # weight decay 1e-5, whiten eps 1e-6: never "0.000"
            return f"{v:.2g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _metrics_table(records: list[dict[str, Any]]) -> str:
    first, last = records[0], records[-1]
    head = "<tr><th>metric</th>" + (f"<th>epoch {first['epoch']}</th>" if len(records) > 1 else "") \
        + f"<th>epoch {last['epoch']} (last)</th></tr>"
    rows = []
    for key, label in METRIC_LABELS:
        if key not in last and key not in first:
            continue
        cells = (f"<td class='num'>{_fmt(first.get(key))}</td>" if len(records) > 1 else "") \
            + f"<td class='num'>{_fmt(last.get(key))}</td>"
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _config_table(config: dict[str, Any] | None) -> str:
    if not config:
        return "<p class='note'>No configuration found (config.yaml or the checkpoint's).</p>"
    rows = []
    for section, values in config.items():
        if isinstance(values, dict):
            items = " · ".join(f"<b>{html.escape(str(k))}</b>&nbsp;{html.escape(_fmt(v))}" for k, v in values.items())
        else:
            items = html.escape(_fmt(values))
        rows.append(f"<tr><td>{html.escape(str(section))}</td><td>{items}</td></tr>")
    return f"<table class='config'><tr><th>section</th><th>settings</th></tr>{''.join(rows)}</table>"


def _config_of(run: Run | None, run_dir: Path) -> dict[str, Any] | None:
    """The run's typed configuration as a dict (the checkpoint's, else config.yaml's), or None."""
    try:
        return (run.config if run is not None else RunDir(run_dir).read_config()).to_dict()
    except ValueError:  # no config.yaml (ConfigError), none in the checkpoint (CheckpointError)
        return None


def render_html(run_dir: Path, records: list[dict[str, Any]], config: dict[str, Any] | None,
                sections: list[Section], opt: ReportOptions, seconds: float, parts: dict[str, float]) -> str:
    """The report page (pure function of its inputs; images are referenced by file name)."""
    e = html.escape
    last = records[-1]
    summary = (f"{len(records)} epoch{'s' if len(records) != 1 else ''}")
    if last.get("nmi_labels") is not None:
        summary += f", NMI vs labels {last['nmi_labels']:.3f}"
    if last.get("nmi_prev") is not None:
        summary += f", NMI vs previous epoch {last['nmi_prev']:.3f}"
    data = (config or {}).get("data", {}) if isinstance(config, dict) else {}
    model = (config or {}).get("model", {}) if isinstance(config, dict) else {}
    what = ", ".join(x for x in (str(data.get("name", "")), str(model.get("arch", "")),
                                 "Sobel" if model.get("sobel") else ("raw RGB" if model else "")) if x)
    out = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>DeepCluster report: {e(run_dir.name)}</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>DeepCluster report: {e(run_dir.name)}</h1>",
        f"<p class='sub'>{e(what)} — {e(summary)}. Run directory: <code>{e(str(run_dir.resolve()))}</code></p>",
        "<div class='tables'><div><h2>Metrics</h2>", _metrics_table(records), "</div>",
        "<div><h2>Configuration</h2>", _config_table(config), "</div></div>",
    ]
    for s in sections:
        out.append(f"<section id='{e(s.key)}'><h2>{e(s.title)}</h2>")
        if s.intro:
            out.append(f"<p>{e(s.intro)}</p>")
        if s.note:
            out.append(f"<p class='note'>{e(s.note)}</p>")
        if s.figures:
            cls = "grid small" if s.key == "clusters" else "grid"
            out.append(f"<div class='{cls}'>")
            for f in s.figures:
                out.append(f"<figure{' class=wide' if f.wide else ''}><img src='{e(f.file)}' alt='{e(f.alt)}' "
                           "onerror=\"this.classList.add('broken')\">"
                           f"<figcaption>{e(f.caption)}</figcaption></figure>")
            out.append("</div>")
        out.append(s.html_extra + "</section>")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in parts.items())
    opts = ", ".join(f"{k}={v}" for k, v in asdict(opt).items())
    out.append(f"<footer>Generated by <code>deepcluster report</code> in {seconds:.1f}s ({e(timing)}). "
               f"Options: {e(opts)}.</footer></main></body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on ``PATH``, or ``None``."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("headless rendering needs Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="dc-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(page: str | Path, timeout: float = 120) -> str:
    """The DOM of a local page after it loaded in headless Chromium (images included)."""
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", Path(page).resolve().as_uri()], timeout)
    if res.returncode != 0 or "<html" not in res.stdout:
        raise RuntimeError(f"chromium could not load {page}: {res.stderr.strip()[-300:]}")
    return res.stdout


def render_screenshot(page: str | Path, png: str | Path, width: int = 1280, height: int = 4000,
                      timeout: float = 180) -> Path:
    """Render a local page with headless Chromium to ``png`` (``width`` x ``height`` px)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    res = _chromium([f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=10000",
                     Path(page).resolve().as_uri()], timeout)
    if res.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium could not render {page}: {res.stderr.strip()[-300:]}")
    return png


__all__ = ["ReportOptions", "build_report", "dump_dom", "find_chromium", "render_html", "render_screenshot",
           "sample_pass"]
