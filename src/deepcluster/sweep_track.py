"""Do the label-free signals of a k sweep track its labelled scores? (``deepcluster sweep
--track``, docs/SWEEP.md)

:func:`track_epochs` scores every snapshot the sweep's runs kept (``--keep-every``) as
:func:`deepcluster.sweep.evaluate_member` scores a run's last epoch, and
:func:`proxy_correlations` measures, as Spearman rank correlations, how well each
label-free signal orders the (k, epoch) points as each labelled score does: pooled,
across k at the last epoch (choosing k) and within each run (choosing the epoch).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sweep import checkpoint_key, checkpoint_epoch, evaluate_member, member_dir, table_lines

logger = logging.getLogger(__name__)


PROXIES: tuple[tuple[str, str], ...] = (
    ("rankme", "RankMe"), ("stability", "stability"), ("stability_excess", "stability − chance"),
    ("nmi_prev", "NMI-prev"), ("nmi_prev_excess", "NMI-prev − chance"),
)
"""(key, name) of the label-free signals whose agreement with the labelled scores is measured."""
LABELLED: tuple[tuple[str, str], ...] = (("knn", "kNN"), ("nmi", "NMI"), ("acc", "ACC"))
"""(key, name) of the labelled scores."""


def _signal(row: dict[str, Any], key: str) -> float | None:
    """A row's value of ``key``; the ``*_excess`` signals are the raw one minus ``nmi_chance``."""
    if key.endswith("_excess"):
        raw, chance = row.get(key[: -len("_excess")]), row.get("nmi_chance")
        return None if raw is None or chance is None else float(raw) - float(chance)
    value = row.get(key)
    return None if value is None else float(value)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); ``None`` with fewer than 3
    pairs or when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _rho(rows: Sequence[dict[str, Any]], proxy: str, metric: str) -> tuple[float | None, int]:
    pairs = [(_signal(r, proxy), _signal(r, metric)) for r in rows]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    return spearman([x for x, _ in pairs], [y for _, y in pairs]), len(pairs)


def proxy_correlations(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well each label-free signal orders the runs and epochs as each labelled score does.

    ``rows`` are evaluations of several runs (``k``) at several epochs (``epochs``), as
    :func:`track_epochs` makes. Three views, each a Spearman rank correlation per
    (signal, score):

    - ``pooled``: all (k, epoch) points together;
    - ``across_k``: the runs at their last epoch (choosing k);
    - ``within_run``: per run, over its epochs (choosing the epoch), then the mean over runs.

    Returns:
        ``{view: {signal: {score: rho or None}}, "points": {view: n}}``.
    """
    by_k: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_k.setdefault(int(r["k"]), []).append(r)
    last = [max(rs, key=lambda r: r["epochs"]) for rs in by_k.values()]
    out: dict[str, Any] = {"pooled": {}, "across_k": {}, "within_run": {}, "points": {}}
    for proxy, _ in PROXIES:
        for view in ("pooled", "across_k", "within_run"):
            out[view][proxy] = {}
        for metric, _ in LABELLED:
            out["pooled"][proxy][metric] = _rho(rows, proxy, metric)[0]
            out["across_k"][proxy][metric] = _rho(last, proxy, metric)[0]
            per_run = [_rho(rs, proxy, metric)[0] for rs in by_k.values()]
            per_run = [p for p in per_run if p is not None]
            out["within_run"][proxy][metric] = float(np.mean(per_run)) if per_run else None
    out["points"] = {"pooled": len(rows), "across_k": len(last),
                     "within_run": {k: len(rs) for k, rs in sorted(by_k.items())}}
    return out


def correlations_markdown(corr: dict[str, Any]) -> str:
    """The correlations as one Markdown table: a line per signal, a column per (view, score)."""
    views = (("pooled", f"all points (n = {corr['points']['pooled']})"),
             ("across_k", f"across k, last epoch (n = {corr['points']['across_k']})"),
             ("within_run", "within a run, over epochs (mean)"))
    head = ["signal"] + [f"{vname}: {mname}" for _, vname in views for _, mname in LABELLED]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for proxy, pname in PROXIES:
        cells = [corr[view][proxy][metric] for view, _ in views for metric, _ in LABELLED]
        lines.append("| " + " | ".join([pname] + ["—" if c is None else f"{c:+.2f}" for c in cells]) + " |")
    return "\n".join(lines) + "\n"


def epochs_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Every evaluated (k, epoch) as the sweep table's columns, k then epoch ascending."""
    return "\n".join(table_lines(sorted(rows, key=lambda r: (r["k"], r["epochs"])))) + "\n"


def track_epochs(out_dir: str | Path, ks: Sequence[int] | None = None, eval_subset: int | None = None,
                 eval_test_subset: int | None = None) -> dict[str, Any]:
    """Score every kept snapshot of every member as :func:`evaluate_member` scores the
    last epoch, and measure how well the label-free signals track the labelled scores
    (:func:`proxy_correlations`).

    The snapshots are those ``--keep-every`` kept (``k<k>/checkpoint-epochE.pt``), plus each
    member's last epoch. Writes ``sweep-epochs.json`` (rows, correlations) and
    ``sweep-epochs.md`` into ``out_dir``; a row already there for the same checkpoint file
    and subsets is not measured again.

    Returns:
        ``{"rows": [...], "correlations": {...}}``.
    """
    from .io import write_text
    from .machine import machine_info
    from .rundir import RunDir

    out_dir = Path(out_dir)
    members = sorted(int(p.name[1:]) for p in out_dir.glob("k*") if p.name[1:].isdigit() and p.is_dir())
    ks = members if ks is None else sorted(ks)
    path = out_dir / "sweep-epochs.json"
    try:
        cached = {r["checkpoint_key"]: r for r in json.loads(path.read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}
    rows: list[dict[str, Any]] = []
    for k in ks:
        run = member_dir(out_dir, k)
        epochs: list[int | None] = list(RunDir(run).snapshots())
        if not epochs:
            logger.warning("sweep: %s keeps no snapshots (train with --keep-every 1): only its last epoch is scored",
                           run)
        if checkpoint_epoch(run) not in epochs:
            epochs.append(None)
        for e in epochs:
            key = checkpoint_key(RunDir(run).checkpoint_for(e), eval_subset, eval_test_subset)
            row = cached.get(key) or evaluate_member(run, eval_subset, eval_test_subset, epoch=e)
            rows.append(row)
            corr = proxy_correlations(rows)
            write_text(path, json.dumps({"machine": machine_info(), "eval_subset": eval_subset,
                                         "eval_test_subset": eval_test_subset, "rows": rows,
                                         "correlations": corr}, indent=2, default=str) + "\n")
    corr = proxy_correlations(rows)
    write_text(out_dir / "sweep-epochs.md",
               f"# k sweep, every kept epoch: {out_dir}\n\nSpearman rank correlation of each label-free signal "
               "with each labelled score (the columns of sweep.md; `—`: fewer than 3 points or a constant "
               "column).\n\n" + correlations_markdown(corr) + "\n" + epochs_markdown(rows))
    return {"rows": rows, "correlations": corr}
