"""A small Oxford-like instance-retrieval benchmark generated from scikit-image's photographs.

Nothing is downloaded and no image is written to disk: every image is rendered in memory
from ``skimage.data`` and a seed, so the benchmark is the same on every machine.

- **Instances**: the natural photographs of ``PHOTOS`` (colour or grey). For each, a few
  square *query* regions (45-60 % of the short side), rendered with JPEG quality 90.
- **Database views**: for each query region, square crops around it with graded
  distortion (``LEVELS``): *easy* (scale 0.9-1.3 of the region, offset up to 10 %,
  rotation up to 3°, colour ±10 %, blur up to 0.5 px, JPEG 70-90), *hard* (scale 0.6-1.8,
  offset up to 30 %, rotation 10-25°, colour ±40 %, blur 1-2.5 px, JPEG 15-35) and one
  crop of another part of the photograph.
- **Distractors**: crops of other photographs (``DISTRACTOR_PHOTOS``: textures and a
  scanned page, random box, easy or hard distortion) and Fashion-MNIST test images
  upscaled (bicubic) to the rendering size.

The difficulty of a (query, database view) pair is decided by geometry and distortion,
as the revisited Oxford protocol labels pairs (Radenović et al., CVPR 2018): ``o`` =
area of the view's box inside the query box / area of the query box;
easy: ``o >= 0.6`` and an easy view; hard: ``o >= 0.3`` otherwise; junk: a view of the
same photograph with ``o < 0.3`` (same photograph, query region hardly visible: neither
counted right nor wrong). Views of other photographs and the distractors are negatives.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# Natural photographs shipped with scikit-image (no download), the instances.
PHOTOS = ("astronaut", "camera", "cell", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "retina", "rocket", "text")
# Photographs used only as distractors (textures and a scanned page).
DISTRACTOR_PHOTOS = ("brick", "grass", "gravel", "page")


@dataclass(frozen=True)
class Level:
    """Ranges of one distortion grade: crop side as a multiple of the query region's,
    centre offset (fraction of the region's side), rotation (degrees, either sign),
    colour factor deviation, Gaussian blur radius (px at the rendering size), JPEG quality."""

    scale: tuple[float, float]
    shift: float
    rotation: tuple[float, float]
    colour: float
    blur: tuple[float, float]
    jpeg: tuple[int, int]


LEVELS = {
    "query": Level((1.0, 1.0), 0.0, (0.0, 0.0), 0.0, (0.0, 0.0), (90, 90)),
    "easy": Level((0.9, 1.3), 0.1, (0.0, 3.0), 0.1, (0.0, 0.5), (70, 90)),
    "hard": Level((0.6, 1.8), 0.3, (10.0, 25.0), 0.4, (1.0, 2.5), (15, 35)),
}


@dataclass
class Item:
    """One rendered image: its source photograph (None for Fashion-MNIST), square box
    ``(x, y, side)`` in the photograph's pixels, and distortion level."""

    photo: str | None
    box: tuple[float, float, float]
    level: str
    image: Image.Image = field(repr=False)


@dataclass
class PhotoBenchmark:
    """Queries, database (instance views first, then distractors) and the revisited
    ground truth ``gnd`` (per query ``easy``, ``hard``, ``junk`` database indices)."""

    queries: list[Item]
    database: list[Item]
    gnd: list[dict[str, np.ndarray]]

    def counts(self) -> dict[str, int]:
        """Sizes, and how many easy / hard / junk pairs the ground truth holds."""
        return {"photos": len({q.photo for q in self.queries}), "queries": len(self.queries),
                "database": len(self.database), "views": sum(d.photo in PHOTOS for d in self.database),
                **{f"{k}_pairs": int(sum(len(g[k]) for g in self.gnd)) for k in ("easy", "hard", "junk")}}


def load_photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as an RGB PIL image (grey photographs repeated to 3 channels)."""
    from skimage import data

    x = np.asarray(getattr(data, name)())
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(x[:, :, :3]).astype(np.uint8), "RGB")


def _clip_box(cx: float, cy: float, side: float, w: int, h: int) -> tuple[float, float, float]:
    """A square box ``(x, y, side)`` centred near ``(cx, cy)``, moved inside a ``w x h`` image."""
    side = min(side, w, h)
    return (min(max(cx - side / 2, 0.0), w - side), min(max(cy - side / 2, 0.0), h - side), side)


def covered(view: tuple[float, float, float], query: tuple[float, float, float]) -> float:
    """Fraction of the query box's area inside the view box (boxes ``(x, y, side)``)."""
    ix = max(0.0, min(view[0] + view[2], query[0] + query[2]) - max(view[0], query[0]))
    iy = max(0.0, min(view[1] + view[2], query[1] + query[2]) - max(view[1], query[1]))
    return ix * iy / query[2] ** 2


def render(photo: Image.Image, box: tuple[float, float, float], level: str, rng: np.random.Generator,
           size: int) -> Image.Image:
    """Crop ``box`` from ``photo`` rotated about the box centre, resize to ``size`` px and
    apply ``level``'s colour change, blur and JPEG compression (parameters drawn from ``rng``)."""
    lv = LEVELS[level]
    x, y, side = box
    angle = float(rng.uniform(*lv.rotation) * rng.choice((-1.0, 1.0)))
    if angle:  # rotate a patch with room for the box's corners, about the box centre
        m = side * 0.25
        patch = photo.crop((round(x - m), round(y - m), round(x + side + m), round(y + side + m)))
        fill = tuple(int(v) for v in np.asarray(photo.crop((round(x), round(y), round(x + side),
                                                             round(y + side)))).reshape(-1, 3).mean(0))
        img = patch.rotate(angle, Image.BILINEAR, fillcolor=fill)  # outside the photograph: black, as a border
        x, y = x - round(x - m), y - round(y - m)
    else:
        img = photo
    img = img.crop((round(x), round(y), round(x + side), round(y + side))).resize((size, size), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(float(1 + rng.uniform(-lv.colour, lv.colour)))
    radius = float(rng.uniform(*lv.blur))
    if radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(lv.jpeg[0], lv.jpeg[1] + 1)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _views(name: str, photo: Image.Image, query: tuple[float, float, float], views: int,
           rng: np.random.Generator, size: int) -> list[Item]:
    """``views`` easy/hard crops around ``query`` (alternating, easy first) and one crop
    of another part of the photograph (when one covering < 20 % of the query exists)."""
    w, h = photo.size
    cx, cy = query[0] + query[2] / 2, query[1] + query[2] / 2
    out = []
    for i in range(views):
        level = ("easy", "hard")[i % 2]
        lv = LEVELS[level]
        dx, dy = rng.uniform(-lv.shift, lv.shift, 2) * query[2]
        box = _clip_box(cx + dx, cy + dy, query[2] * rng.uniform(*lv.scale), w, h)
        out.append(Item(name, box, level, render(photo, box, level, rng, size)))
    for _ in range(50):
        side = query[2] * rng.uniform(0.8, 1.2)
        box = _clip_box(rng.uniform(0, w), rng.uniform(0, h), side, w, h)
        if covered(box, query) < 0.2:
            out.append(Item(name, box, "easy", render(photo, box, "easy", rng, size)))
            break
    return out


def pair_label(view: Item, query: Item) -> str:
    """``easy``, ``hard``, ``junk`` or ``negative`` for a database view and a query."""
    if view.photo != query.photo or view.photo is None:
        return "negative"
    o = covered(view.box, query.box)
    if o >= 0.6 and view.level == "easy":
        return "easy"
    return "hard" if o >= 0.3 else "junk"


def distractors(photos: int, fmnist: int, rng: np.random.Generator, size: int, split: str = "test") -> list[Item]:
    """Crops of ``DISTRACTOR_PHOTOS`` (random box of 30-80 % of the short side, easy or
    hard distortion) and upscaled Fashion-MNIST images of ``split``. With another seed and
    the training split: the set the R-MAC whitening is learned on."""
    out = []
    sources = {n: load_photo(n) for n in DISTRACTOR_PHOTOS} if photos else {}
    for i in range(photos):
        name = DISTRACTOR_PHOTOS[i % len(DISTRACTOR_PHOTOS)]
        w, h = sources[name].size
        box = _clip_box(rng.uniform(0, w), rng.uniform(0, h), min(w, h) * rng.uniform(0.3, 0.8), w, h)
        level = ("easy", "hard")[int(rng.integers(2))]
        out.append(Item(name, box, level, render(sources[name], box, level, rng, size)))
    if fmnist:
        from deepcluster.data import build_source

        source = build_source("fashion-mnist", split=split)
        for i in np.sort(rng.choice(len(source), fmnist, replace=False)):
            out.append(Item(None, (0.0, 0.0, 0.0), "fmnist", source.load(int(i)).resize((size, size), Image.BICUBIC)))
    return out


def make_benchmark(seed: int = 0, photos: tuple[str, ...] = PHOTOS, queries_per_photo: int = 3,
                   views_per_query: int = 4, photo_distractors: int = 1000, fmnist_distractors: int = 1000,
                   size: int = 224) -> PhotoBenchmark:
    """Render the benchmark (every image ``size`` x ``size`` RGB), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    queries, views = [], []
    for name in photos:
        photo = load_photo(name)
        w, h = photo.size
        for _ in range(queries_per_photo):
            side = min(w, h) * rng.uniform(0.45, 0.6)
            box = _clip_box(rng.uniform(0, w), rng.uniform(0, h), side, w, h)
            queries.append(Item(name, box, "query", render(photo, box, "query", rng, size)))
            views += _views(name, photo, box, views_per_query, rng, size)
    database = views + distractors(photo_distractors, fmnist_distractors, rng, size)
    gnd = []
    for q in queries:
        labels = np.array([pair_label(v, q) for v in views] + ["negative"] * (len(database) - len(views)))
        gnd.append({k: np.flatnonzero(labels == k) for k in ("easy", "hard", "junk")})
    return PhotoBenchmark(queries, database, gnd)
