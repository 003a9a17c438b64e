"""Load a DeepCluster backbone as a plain ``nn.Module``: ``load_backbone(path_or_run)``.

Accepts what ``deepcluster export-model --format safetensors`` writes or a run directory /
checkpoint ``.pt``; either way the result is a :class:`deepcluster.standalone.Backbone`
(Sobel front end folded exactly into ``features.0``) in eval mode, with
``forward_features`` (the clustering feature: fc7 before its ReLU by default),
``forward_conv``, ``forward_backbone``, ``features`` (the conv stages) and ``classifier``.
``hubconf.py`` at the repository root offers the same through ``torch.hub.load``.
"""

from __future__ import annotations

from pathlib import Path

from . import standalone


def load_backbone(path_or_run: str | Path, epoch: int | str | None = None) -> standalone.Backbone:
    """The backbone in ``path_or_run``: an exported ``.safetensors`` file, a run directory
    or a checkpoint ``.pt`` (``epoch`` as in :func:`deepcluster.export_model.resolve_checkpoint`).

    Raises:
        ValueError: a missing or unreadable file, or an architecture that cannot be exported.
    """
    from .checkpoint import load_model
    from .export_model import ExportError, resolve_checkpoint, to_backbone

    p = Path(path_or_run)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise ExportError(f"no exported backbone at {p}")
        return standalone.load(str(p))
    model, state = load_model(resolve_checkpoint(p, epoch))
    return to_backbone(model, state)[0]
