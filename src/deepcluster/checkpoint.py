"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked for fit.

A checkpoint is one dict of tensors and plain values (no pickled objects), so loading
it never runs code. Writing goes to a temporary file in the same directory, is flushed
to disk, then renamed over the target: a crash or a full disk leaves the previous
checkpoint intact.

Versions: ``format_version`` is the layout of the dict; a checkpoint of another format
is refused everywhere. ``package_version`` is the release that wrote it; any release
reading the same format can load it (evaluation, export), but a run resumes only under
the same major.minor release (see :func:`check_compatible`): another patch release
resumes with a warning, as bit-exact continuation is promised within one release only.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import Config, ConfigError, config_from_saved
from .io import atomic_write

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message names the mismatch."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically ``torch.save`` ``state`` (tensors and plain values only) to ``path``."""
    state = dict(state)
    state.setdefault("format_version", FORMAT_VERSION)
    state.setdefault("package_version", __version__)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (a run directory or a ``.pt`` file) without unpickling code."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unsafe or corrupt files get one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {p} safely (weights_only=True): {first}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p} is not a deepcluster checkpoint (no 'model' entry)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format {state.get('format_version')} (package {state.get('package_version')}), "
            f"this package reads format {FORMAT_VERSION} (package {__version__})"
        )
    return state


def _release(version: Any) -> tuple[str, ...]:
    """``"0.1.3"`` -> ``("0", "1")``: the major.minor release of a version string."""
    return tuple(str(version).split(".")[:2])


META_DEFAULTS = {"cluster_feature": "fc7", "projection_dim": None}
"""Values of ``meta`` keys that checkpoints written before the key existed had."""


def check_compatible(state: dict[str, Any], expected: dict[str, Any], path: str | Path = "checkpoint",
                     same_release: bool = True) -> None:
    """Refuse ``state`` if any ``expected`` key (``arch``, ``k``, ...) differs.

    With ``same_release`` (resuming a run) a checkpoint written by another major.minor
    release of the package is refused too; another patch release is accepted with a
    warning (bit-exact continuation is promised within one release only).
    """
    meta = state.get("meta", {})
    for key, want in expected.items():
        have = meta.get(key, META_DEFAULTS.get(key))
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={have!r}, this run has {key}={want!r}; "
                "use the same setting or a new --output-dir"
            )
    have = state.get("package_version")
    if not same_release or have is None:  # save_checkpoint always records it
        return
    if _release(have) != _release(__version__):
        raise CheckpointError(
            f"checkpoint {path} was written by deepcluster {have}, this is {__version__}: resume it with "
            f"deepcluster {'.'.join(_release(have))}.x or start a new --output-dir (eval and export load it as is)"
        )
    if have != __version__:
        logging.getLogger(__name__).warning(
            "resuming a run written by deepcluster %s with %s: the continuation may differ from an "
            "uninterrupted run of either release", have, __version__)


def check_resume_state(state: dict[str, Any], num_images: int, path: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint whose fields a resume would trust but cannot use: types,
    ranges and shapes (``epoch``, the assignment history, the weights, the optimiser),
    before anything on disk is touched.

    Raises:
        CheckpointError: one line naming the checkpoint and the field.
    """
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} cannot be resumed: {field} {why}; nothing was changed")

    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise bad("epoch", f"must be a positive number of completed epochs, got {epoch!r}")
    hist = state.get("assignments")
    if not isinstance(hist, torch.Tensor) or hist.ndim != 2 or hist.dtype.is_floating_point:
        raise bad("assignments", "must be an integer (epochs, images) tensor")
    if hist.shape[1] != num_images or hist.shape[0] not in (1, epoch):  # the last epoch's; older: every epoch's
        raise bad("assignments", f"has shape {tuple(hist.shape)}, expected (1, {num_images}) (or ({epoch}, "
                                 f"{num_images}) from an older release) for {num_images} images")
    if hist.numel() and int(hist.min()) < 0:
        raise bad("assignments", "holds negative cluster ids")
    head = state.get("model", {}).get("head.weight")
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        raise bad("model", "has no 2-D head.weight")
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("optimizer", "is not an optimiser state (state, param_groups)")


def saved_config(state: dict[str, Any], where: str = "the checkpoint") -> Config:
    """The typed :class:`~deepcluster.config.Config` a checkpoint was trained with
    (older layouts migrated by :func:`~deepcluster.config.config_from_saved`).

    Raises:
        CheckpointError: the checkpoint holds no configuration, or an invalid one.
    """
    d = state.get("config")
    if not isinstance(d, dict) or not d:
        raise CheckpointError(f"{where} has no training configuration (state['config']); "
                              "it was not written by deepcluster train")
    try:
        return config_from_saved(d)
    except ConfigError as e:
        raise CheckpointError(f"{where} holds an invalid configuration: {e}") from None


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and python, as tensors/plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the trained network of a checkpoint (a run directory or a ``.pt`` file).

    Returns:
        ``(model, state)``: the :class:`~deepcluster.models.DeepClusterNet` in eval mode
        with the checkpoint's weights (head included), and the checkpoint dict.
    """
    from .models import model_from_meta

    state = load_checkpoint(path, map_location="cpu")
    meta = state.get("meta", {})
    try:
        model = model_from_meta(meta, num_clusters=state["model"]["head.weight"].shape[0])
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match architecture {meta.get('arch')!r}: {first}") from None
    return model.to(map_location).eval(), state
