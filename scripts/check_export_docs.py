"""Run every code block of docs/EXPORT.md as written, in a temporary folder.

The folder holds what the snippets name: ``runs/fmnist`` (an alexnet_small checkpoint,
k = 100, plus ``checkpoint-epoch10.pt`` and ``best.pt``), ``vgg16.safetensors`` (a 32 px
Sobel vgg16, k = 100) and ``standalone.py``. Bash blocks run with ``deepcluster`` on the
PATH; Python blocks run with ``python -I`` and ``deepcluster`` made unimportable (they
must need torch, safetensors, torchvision, onnxruntime only). ``/path/to/deepcluster``
becomes this checkout. Exits 1 if a block fails. Usage::

    PYTHONPATH=src .venv/bin/python scripts/check_export_docs.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deepcluster.checkpoint import save_checkpoint
from deepcluster.export_model import export_model
from deepcluster.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def save_run(path: Path, arch: str, size: int) -> Path:
    model = create_model(arch, image_size=size, num_clusters=100)
    meta = {"arch": arch, "sobel": True, "image_size": size, "fc_dim": None, "width": None, "cluster_feature": "fc7",
            "projection_dim": None, "k": 100, "num_images": 60000, "data": "fashion-mnist"}
    save_checkpoint({"model": model.state_dict(), "meta": meta, "epoch": 12, "config": {}}, path)
    return path


def main() -> int:
    blocks = re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "docs" / "EXPORT.md").read_text(), re.S)
    failed = 0
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "runs" / "fmnist").mkdir(parents=True)
        ckpt = save_run(work / "runs" / "fmnist" / "checkpoint.pt", "alexnet_small", 28)
        for name in ("checkpoint-epoch10.pt", "best.pt"):
            shutil.copy(ckpt, ckpt.parent / name)
        export_model(save_run(work / "vgg.pt", "vgg16", 32), "safetensors", work / "vgg16.safetensors")
        shutil.copy(ROOT / "src" / "deepcluster" / "standalone.py", work)
        (work / "bin").mkdir()
        (work / "bin" / "deepcluster").write_text(f'#!/bin/sh\nPYTHONPATH={ROOT / "src"} exec {sys.executable} '
                                                  '-W ignore -m deepcluster "$@"\n')
        (work / "bin" / "deepcluster").chmod(0o755)
        env = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}"}
        for lang, code in blocks:
            code = code.replace("/path/to/deepcluster", str(ROOT))
            cmd = (["bash", "-e", "-c", code] if lang == "bash" else
                   [sys.executable, "-I", "-W", "ignore", "-c",
                    "import sys; sys.path.insert(0, '.'); sys.modules['deepcluster'] = None\n" + code])
            res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            print(f"[{'ok' if res.returncode == 0 else 'FAILED'}] {lang}: {code.strip().splitlines()[0]}")
            if res.returncode:
                failed += 1
                print(res.stderr.strip()[-2000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
