"""Oxford / Paris buildings ground truth, read safely.

Two layouts are understood:

- **Revisited** (Radenović et al., CVPR 2018): ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``,
  a pickle of ``{"imlist": [name, ...], "qimlist": [name, ...], "gnd": [{"bbx": [x1, y1,
  x2, y2], "easy": [...], "hard": [...], "junk": [...]}, ...]}``; the index lists are
  0-based positions in ``imlist``. Scored in three settings (see
  :func:`deepcluster.metrics.revisited_ground_truth`).
- **Classic** (Philbin et al. 2007): per query ``<name>_<n>_query.txt`` holding
  ``oxc1_<image> x1 y1 x2 y2`` and ``<name>_<n>_{good,ok,junk}.txt`` listing image names;
  positives = good + ok, junk ignored. The database is the list of image names the caller
  gives (the image folder's file names without extension).

A pickle can run any code when it is loaded, so the revisited files are read with
:class:`GroundTruthUnpickler`, which builds only what numpy arrays need and refuses every
other global. In both protocols a query image is cropped to its bounding box before its
descriptor is computed (:func:`crop_query`).
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import REVISITED_SETTINGS, revisited_ground_truth

# What unpickling numpy arrays and scalars needs (numpy 1 names ``numpy.core``, numpy 2
# ``numpy._core``; protocol 2 stores the array bytes through ``_codecs.encode`` and an
# empty buffer as ``bytes()``, protocol 5 through ``_frombuffer``). Each only builds
# arrays, dtypes or bytes.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}
_CLASSIC_QUERY = re.compile(r"^(?P<stem>.+)_query\.txt$")


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read or is not what it says."""


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that admits only the globals numpy arrays need (``_ALLOWED``).

    Any other global (``os.system``, ``builtins.eval``, a class of some module, ...) is
    refused with :class:`GroundTruthError` *before* it is imported or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise GroundTruthError(f"refers to {module}.{name}, which a ground-truth file never needs; refusing to "
                                   "load it (a pickle can run code)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 1 pickle under numpy 2
        return super().find_class(module, name)


def safe_unpickle(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` with :class:`GroundTruthUnpickler`; every failure is a one-line
    :class:`GroundTruthError` naming ``where``."""
    try:
        return GroundTruthUnpickler(io.BytesIO(data)).load()
    except GroundTruthError as e:
        raise GroundTruthError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        raise GroundTruthError(f"{where} is not a readable ground-truth pickle ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


@dataclass
class GroundTruth:
    """Queries and their relevant images for one benchmark.

    Attributes:
        protocol: ``"revisited"`` (per query ``easy``/``hard``/``junk``) or ``"classic"``
            (``good``/``ok``/``junk``).
        imlist: ``(N,)`` database image names (no extension), the index space.
        qimlist: ``(Q,)`` query image names.
        bbx: ``(Q, 4)`` float64 query boxes ``(x1, y1, x2, y2)`` in pixels.
        gnd: per query a dict of int64 index arrays (the protocol's keys).
    """

    protocol: str
    imlist: list[str]
    qimlist: list[str]
    bbx: np.ndarray
    gnd: list[dict[str, np.ndarray]]

    def settings(self) -> dict[str, list[dict[str, np.ndarray]]]:
        """Positives (``"ok"``) and junk per query for each scored setting: easy, medium,
        hard (revisited) or classic (positives good + ok)."""
        if self.protocol == "revisited":
            return {s: revisited_ground_truth(self.gnd, s) for s in REVISITED_SETTINGS}
        return {"classic": [{"ok": np.concatenate([g["good"], g["ok"]]), "junk": g["junk"]} for g in self.gnd]}


def _index_array(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise GroundTruthError(f"{what} is not a list of image indices") from None
    if arr.size and (not np.all(arr == np.round(arr)) or arr.min() < 0 or arr.max() >= n):
        raise GroundTruthError(f"{what} holds indices outside 0..{n - 1}")
    return arr.astype(np.int64)


def _box(value: Any, what: str) -> np.ndarray:
    try:
        box = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        box = np.zeros(0)
    if box.size != 4 or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise GroundTruthError(f"{what} is not a box (x1, y1, x2, y2) with x2 > x1 and y2 > y1: {value!r}")
    return box


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise GroundTruthError(f"{what} is not a list of image names")
    return list(value)


def _check_disjoint(query: dict[str, np.ndarray], where: str) -> None:
    keys = list(query)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if np.intersect1d(query[a], query[b]).size:
                raise GroundTruthError(f"{where}: an image is listed both as {a} and as {b}")


def parse_revisited(obj: Any, where: str = "ground truth") -> GroundTruth:
    """Validate the revisited layout (``imlist``, ``qimlist``, ``gnd``) into a :class:`GroundTruth`."""
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= set(obj):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise GroundTruthError(f"{where} is not a revisited Oxford/Paris ground truth: expected a dict with "
                               f"imlist, qimlist and gnd, got {got}")
    imlist, qimlist = _names(obj["imlist"], f"{where}: imlist"), _names(obj["qimlist"], f"{where}: qimlist")
    gnd_in = obj["gnd"]
    if not isinstance(gnd_in, (list, tuple)) or len(gnd_in) != len(qimlist):
        raise GroundTruthError(f"{where}: gnd must be a list with one entry per query ({len(qimlist)})")
    gnd, boxes = [], []
    for i, g in enumerate(gnd_in):
        if not isinstance(g, dict) or not {"bbx", "easy", "hard", "junk"} <= set(g):
            raise GroundTruthError(f"{where}: gnd[{i}] must be a dict with bbx, easy, hard and junk")
        q = {k: _index_array(g[k], len(imlist), f"{where}: gnd[{i}]['{k}']") for k in ("easy", "hard", "junk")}
        _check_disjoint(q, f"{where}: query {i}")
        boxes.append(_box(g["bbx"], f"{where}: gnd[{i}]['bbx']"))
        gnd.append(q)
    return GroundTruth("revisited", imlist, qimlist, np.array(boxes).reshape(-1, 4), gnd)


def load_revisited(path: str | Path) -> GroundTruth:
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (safely) and validate it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GroundTruthError(f"cannot read ground truth {path}: {e.strerror}") from None
    return parse_revisited(safe_unpickle(data, str(path)), str(path))


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GroundTruthError(f"cannot read ground truth {path}: {e}") from None


def _classic_query(path: Path, index: dict[str, int]) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    """One ``*_query.txt`` and its good/ok/junk companions."""
    fields = (_read_lines(path) or [""])[0].split()
    if len(fields) != 5:
        raise GroundTruthError(f"{path}: expected 'oxc1_<image> x1 y1 x2 y2', got {' '.join(fields)!r}")
    name = fields[0][len("oxc1_"):] if fields[0].startswith("oxc1_") else fields[0]
    try:
        box = _box([float(v) for v in fields[1:]], str(path))
    except ValueError:
        raise GroundTruthError(f"{path}: the box {fields[1:]} is not four numbers") from None
    stem = str(path)[:-len("_query.txt")]
    query = {}
    for kind in ("good", "ok", "junk"):
        names = _read_lines(Path(f"{stem}_{kind}.txt"))
        missing = [n for n in names if n not in index]
        if missing:
            raise GroundTruthError(f"{stem}_{kind}.txt names {len(missing)} images not in the database, "
                                   f"e.g. {missing[0]!r}")
        query[kind] = np.array([index[n] for n in names], dtype=np.int64)
    _check_disjoint(query, str(path))
    return name, box, query


def load_classic(directory: str | Path, image_names: Sequence[str]) -> GroundTruth:
    """Read the classic Oxford5k / Paris6k ground-truth folder.

    Args:
        directory: the folder of ``*_query.txt``, ``*_good.txt``, ``*_ok.txt``, ``*_junk.txt``.
        image_names: the database, as image names without extension (``all_souls_000013``);
            the good/ok/junk indices point into it.
    """
    directory = Path(directory)
    queries = sorted(p for p in directory.glob("*_query.txt")) if directory.is_dir() else []
    if not queries:
        raise GroundTruthError(f"{directory} holds no *_query.txt files (classic Oxford/Paris ground truth)")
    missing = [f"{str(q)[:-len('_query.txt')]}_{k}.txt" for q in queries for k in ("good", "ok", "junk")
               if not Path(f"{str(q)[:-len('_query.txt')]}_{k}.txt").is_file()]
    if missing:
        raise GroundTruthError(f"ground truth incomplete: {missing[0]} is missing ({len(missing)} files in all)")
    imlist = list(image_names)
    index = {n: i for i, n in enumerate(imlist)}
    parsed = [_classic_query(q, index) for q in queries]
    return GroundTruth("classic", imlist, [p[0] for p in parsed], np.array([p[1] for p in parsed]).reshape(-1, 4),
                       [p[2] for p in parsed])


def load_ground_truth(path: str | Path, image_names: Sequence[str] | None = None) -> GroundTruth:
    """A revisited ``.pkl`` file or a classic ground-truth folder (which needs ``image_names``)."""
    path = Path(path)
    if path.is_dir():
        if image_names is None:
            raise GroundTruthError(f"{path} is a classic ground-truth folder: give the database image names")
        return load_classic(path, image_names)
    return load_revisited(path)


def crop_query(image, bbx: Sequence[float]):
    """The query image cropped to its box, as the protocol scores queries (revisitop:
    ``PIL.Image.crop(bbx)``, which rounds the corners to whole pixels). ``bbx`` is
    ``(x1, y1, x2, y2)``; it is clipped to the image.

    Args:
        image: a ``PIL.Image``.

    Raises:
        GroundTruthError: the box does not overlap the image.
    """
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, image.width), min(y2, image.height)
    if x2 <= x1 or y2 <= y1:
        raise GroundTruthError(f"query box {list(bbx)} lies outside the {image.width}x{image.height} image")
    return image.crop((x1, y1, x2, y2))
