"""The package's shape: dependency directions, and a loop that fits on a screen.

Checked on the source (AST), so a new import or an overgrown function fails here with
its name, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "deepcluster"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``deepcluster.*`` module ``path`` imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("deepcluster")}
    return out


def files(*patterns: str) -> list[Path]:
    return sorted(p for pat in patterns for p in SRC.glob(pat))


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for p in paths:
        for imp in imports_of(p):
            if any(imp == f or imp.startswith(f + ".") for f in forbidden):
                bad.append(f"{module_name(p)} imports {imp}")
    return bad


OURS = tuple(f"deepcluster.{m}" for m in (
    "train", "session", "optim", "strategies", "features", "monitor", "eval", "viz", "report", "export", "cli",
    "checkpoint", "rundir", "config", "data", "models", "io", "runtime", "machine", "diagnostics", "tensorboard",
    "metrics", "clustering"))


def test_clustering_and_metrics_import_nothing_of_ours_but_distributed():
    forbidden = tuple(o for o in OURS if o not in ("deepcluster.clustering", "deepcluster.metrics"))
    assert offenders(files("clustering/*.py", "metrics.py"), forbidden) == []
    assert offenders(files("metrics.py"), ("deepcluster.clustering",)) == []


def test_models_and_data_stay_low():
    high = ("deepcluster.train", "deepcluster.session", "deepcluster.optim", "deepcluster.strategies",
            "deepcluster.features", "deepcluster.monitor", "deepcluster.eval", "deepcluster.viz", "deepcluster.report",
            "deepcluster.export", "deepcluster.cli", "deepcluster.checkpoint", "deepcluster.rundir")
    assert offenders(files("models/*.py", "data/*.py"), high) == []
    assert offenders(files("models/*.py"), ("deepcluster.data",)) == []
    assert offenders(files("data/*.py"), ("deepcluster.models",)) == []


def test_the_loop_imports_no_evaluation_and_no_plotting():
    loop = files("train.py", "session.py", "optim.py", "strategies.py", "features.py")
    assert offenders(loop, ("deepcluster.eval", "deepcluster.viz", "deepcluster.report", "deepcluster.monitor",
                            "deepcluster.tensorboard", "deepcluster.export")) == []


def test_io_is_the_lowest_layer_and_nothing_imports_the_cli():
    assert offenders(files("io.py"), OURS) == []
    outside_cli = [p for p in files("**/*.py") if "cli" not in p.relative_to(SRC).parts and p.name != "__main__.py"]
    assert offenders(outside_cli, ("deepcluster.cli",)) == []
    # data, viz and report write through io, never through checkpoint
    assert offenders(files("data/*.py", "viz/*.py", "report.py"), ("deepcluster.checkpoint",)) == []


def function_lengths() -> dict[str, int]:
    out = {}
    for p in files("**/*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{module_name(p)}.{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    return out


def test_the_epoch_fits_on_a_screen():
    assert len((SRC / "train.py").read_text().splitlines()) <= 400
    lengths = {k.split(":")[0]: v for k, v in function_lengths().items()}
    assert lengths["deepcluster.train.run_epoch"] <= 60


def test_no_function_is_longer_than_80_lines():
    long = {k: v for k, v in function_lengths().items() if v > 80}
    assert long == {}, long


@pytest.mark.parametrize("name", ["train", "strategies", "features", "rundir"])
def test_the_layout_checker_sees_real_imports(name):
    """The checker is not vacuous: each of these modules imports something of ours."""
    assert imports_of(SRC / f"{name}.py")
