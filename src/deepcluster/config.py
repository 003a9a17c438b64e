"""Typed configuration: dataclasses, YAML in and out, strict validation.

A run is described by one :class:`Config` (five sections). It is resolved once at the
CLI edge (defaults <- preset <- ``--config FILE.yaml`` <- flags) and written to the run
directory as ``config.yaml``; library functions take explicit arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .io import write_text
from .sizing import SIZED_KEYS, describe, size_rule


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


LABELS = ("folders", "none")
"""``data.labels``: ``folders`` (an ImageFolder tree's class sub-folders, a torchvision
set's classes) or ``none`` (no labels: sub-folders are only where the images are kept)."""


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    """fashion-mnist, mnist, cifar10, stl10 or folder."""
    root: str | None = None
    """Where the data set's files are (required for folder, cifar10, stl10)."""
    split: str = "train"
    """Split clustered and trained on: train or test (stl10 also unlabeled, train+unlabeled);
    a folder has no splits (ignored)."""
    image_size: int | None = None
    """Side of the square network input; default per data set (28 for (Fashion-)MNIST)."""
    subset: int | None = None
    """Train on a fixed random subset of this many images (quick runs, tests)."""
    download: bool = True
    """Allow torchvision's download when the files are nowhere on disk."""
    max_bad_fraction: float = 0.5
    """A folder with more unreadable images than this fraction is an error."""
    labels: str = "folders"
    """folders: an ImageFolder tree's class sub-folders are its labels (used only for
    analysis: NMI vs labels, evaluations); none: the images have no labels (sub-folders
    such as photos/2019-01 are only where they are kept)."""


@dataclass
class ModelConfig:
    arch: str = "alexnet_small"
    """Registered architecture: alexnet, alexnet_small, vgg16."""
    sobel: bool = True
    """Fixed grayscale + Sobel front end (paper); False feeds raw RGB."""
    dropout: float = 0.5
    width: float | None = None
    """alexnet_small only: channel multiplier of the paper's widths (default 0.5)."""
    fc_dim: int | None = None
    """Width of fc6/fc7 (default: 4096 for alexnet/vgg16, 1024 for alexnet_small)."""
    projection_dim: int = 128
    """Width of the L2-normalised projection of ReLU(fc7) (only with ``cluster.feature: projection``)."""


@dataclass
class ClusterConfig:
    method: str = "kmeans"
    """kmeans or pic."""
    k: int = 100
    """Number of k-means clusters (paper: 10,000 for ImageNet's 1.3M images)."""
    pca_dim: int = 256
    whiten: bool = True
    whiten_eps: float = 1e-6
    """Regularised whitening: each principal component is divided by
    ``sqrt(eigenvalue + whiten_eps * largest eigenvalue)``. 1e-6 (default) whitens fully,
    as the paper; larger values equalise the strong directions and keep the weak ones (the
    noise of a small data set) damped; a large value approaches no whitening."""
    niter: int = 20
    clusterings: int = 1
    """k-means runs per epoch on the same features, each with its own seed and its own new
    head; the loss is the mean over heads (DeepCluster-v2's several clusterings). The
    first is the run's clustering (sampler, metrics, checkpoint)."""
    backend: str = "faiss"
    """k-means backend: faiss, faiss-gpu or torch."""
    feature: str = "fc7"
    """What is clustered: fc7 (paper, before its ReLU), backbone (the flattened conv
    stack output, fc6's input) or projection (DeepCluster-v2: a linear layer on ReLU(fc7),
    ``model.projection_dim`` wide, L2-normalised, which the head then reads); the
    pseudo-labels train fc6 -> fc7 (-> projection) -> head."""
    pca_sample: int | None = None
    """Images used to fit the PCA (default: all when N x fc_dim floats fit in 1 GB, else
    max(20 x fc_dim, 50,000) random images; see docs/SCALE.md)."""
    bn: str = "running"
    """Batch-norm statistics of the features clustered: running (those accumulated while
    training on augmented crops) or recompute (recomputed each epoch, exactly, on the
    un-augmented views of up to 10,000 images: "precise BN")."""
    feature_dtype: str = "float32"
    """Storage of the PCA-reduced features between extraction and k-means: float32 or float16."""
    pic_sigma: float = 0.2
    pic_neighbors: int = 5
    pic_iters: int = 200


@dataclass
class AugmentConfig:
    """The random views an image is trained on (the clustering view is never augmented)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop scale range of the training augmentation."""
    hflip: bool = True
    affine: float = 0.0
    """Strength of a random affine warp before the crop (0: off; 1: rotation up to 15
    degrees, translation up to 10 %, shear up to 10 degrees)."""
    erasing: float = 0.0
    """Probability of random erasing (a rectangle of 2-20 % of the image set to 0)."""
    jitter: float = 0.0
    """Colour-jitter strength (0: off; 1: brightness/contrast/saturation +-40 %, with
    probability 0.8; on grey images brightness and contrast)."""
    blur: float = 0.0
    """Probability of a Gaussian blur (kernel about 10 % of the side, sigma 0.1-2)."""
    crops: int = 1
    """Augmented views of each image per step, each trained on the image's pseudo-label
    (DeepCluster-v2's multi-crop, at one resolution: fc6 fixes the input size); the cost
    of an epoch's training grows with it."""


@dataclass
class OptimConfig:
    epochs: int = 5
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lr_schedule: str = "constant"
    """constant (paper) or cosine: epoch e trains at lr * (1 + cos(pi * e / epochs)) / 2."""
    balance: str = "sampler"
    """sampler (uniform over clusters, paper), weight (loss / cluster size) or none."""
    head: str = "random"
    """random (paper: a new linear classifier every epoch), matched (the previous epoch's
    head, its rows moved to the new clusters that share the most images with theirs;
    unmatched rows new) or centroids (DeepCluster-v2: cosine similarity to this epoch's
    centroids, fixed, over ``temperature``)."""
    temperature: float = 0.1
    """Softmax temperature of ``head: centroids``, and of the random head on a projection."""


@dataclass
class RunConfig:
    output_dir: str = "runs/deepcluster"
    device: str = "cpu"
    seed: int = 0
    workers: int = 2
    deterministic: bool = False
    resume: bool = False
    amp: str = "none"
    """Mixed precision of the network: none, bf16, fp16 (needs CUDA; uses a grad scaler) or auto
    (bf16 where the device computes it natively: recent GPUs, CPUs with AVX512-BF16/AMX)."""
    channels_last: bool = True
    """channels_last memory format for the network and its inputs: faster convolutions on the
    CPU (a paper-preset epoch on 60k images 1.17x faster on a 2-core AMD EPYC, extraction
    1.2-1.5x; docs/BENCHMARKS.md) and on GPUs; ``False`` (``--no-channels-last``): contiguous."""
    sync_bn: bool = False
    """SyncBatchNorm across ranks under torch.distributed (CUDA only)."""
    dist_timeout: float = 1800.0
    """Seconds a collective waits for the other ranks before failing (torchrun runs)."""
    eval_every: int = 0
    """Run the kNN probe on a held-out part every N epochs (0: never)."""
    keep_every: int = 0
    """Keep ``checkpoint-epochE.pt`` (weights, PCA, centroids; no optimiser) every N epochs
    beside the rolling ``checkpoint.pt`` (0: never)."""
    keep_last: int = 0
    """Keep at most this many ``checkpoint-epochE.pt`` snapshots, the newest (0: all)."""
    stop_when_worse: bool = False
    """Stop the run after an epoch whose label-free quality check warns (RankMe below 5 %
    of its epoch-0 value: :func:`deepcluster.diagnostics.quality_warning`)."""
    best_metric: str = "knn_top1"
    """The record key whose highest value selects ``best.pt`` (written when the epoch's
    record has it: the kNN probe's ``knn_top1`` with ``eval_every``)."""
    tensorboard: bool = False


@dataclass
class SizeConfig:
    """The size rule (:mod:`deepcluster.sizing`): settings that depend on the number of
    images N chosen from N when the run starts, and recorded here once chosen."""
    rule: str = "off"
    """off (the values as given) or auto (the settings of
    :data:`deepcluster.sizing.SIZED_KEYS` from N, except those in ``pinned``)."""
    pinned: str = ""
    """Comma-separated ``section.key`` of the sized settings the user set (a flag or the
    config file): the rule leaves them as given."""
    images: int | None = None
    """N the rule chose the values for (null: not chosen yet; a resumed run keeps them)."""

    @property
    def pinned_keys(self) -> set[str]:
        return {x for x in self.pinned.split(",") if x}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    size: SizeConfig = field(default_factory=SizeConfig)
    preset: str = "paper"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["augment"]["crop_scale"] = list(d["augment"]["crop_scale"])
        return d


# Presets: overrides of the defaults, by section. ``paper`` is the paper's settings.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    # Chosen by the measured ablations and full runs of experiments/ABLATION.md: no dropout in
    # fc6/fc7 and milder crops were the first one-at-a-time changes that improved the k-NN
    # score of the features (10k images); cosine decay kept more of their k-means
    # structure; bfloat16 (where native; with channels_last, every preset's default) trains
    # twice as fast, so 48 epochs fit the 60-minute budget of a 2-core CPU on 60k images;
    # colour jitter (NMI) and the matched head (kNN) came in with the sixth round's full run
    # (55 min measured).
    "small-images": {
        "model": {"dropout": 0.0},
        "augment": {"crop_scale": [0.5, 1.0], "jitter": 1.0},
        "optim": {"epochs": 48, "lr_schedule": "cosine", "head": "matched"},
        "run": {"amp": "auto"},
        # The values above are those of 60,000 images; on other sizes the settings of
        # deepcluster.sizing.SIZED_KEYS follow deepcluster.sizing.size_rule (docs/RESULTS.md).
        "size": {"rule": "auto"},
    },
}


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to ``tp`` where lossless (int -> float, a numeric string such as
    ``"1e-3"`` -> float, list -> tuple), else an error naming ``where``; floats must be finite."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section_from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {section}.{key}; valid keys: {sorted(names)}")
        out[key] = _check_type(value, hints[key], f"{section}.{key}")
    return cls(**out)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Strictly validated :class:`Config` from nested dicts (unknown keys are errors)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}; valid: {sorted(sections)}")
        if key == "preset":
            kwargs[key] = _check_type(value, str, "preset")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        kwargs[key] = _section_from_dict(typing.get_type_hints(Config)[key], value, key)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


AUGMENT_KEYS = tuple(f.name for f in dataclasses.fields(AugmentConfig))


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config (``config.yaml``, a checkpoint's ``config``) in today's layout.

    Runs written before the ``augment`` section kept the augmentation keys in ``optim``;
    they move to ``augment``. Keys a config predates take their defaults (what those
    runs used), so a migrated config describes the run as it ran.
    """
    if not isinstance(d, dict):
        return d
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    optim = out.get("optim")
    if isinstance(optim, dict):
        moved = {k: optim.pop(k) for k in AUGMENT_KEYS if k in optim}
        if moved:
            out["augment"] = {**moved, **(out.get("augment") or {})}
    return out


def config_from_saved(d: dict[str, Any]) -> Config:
    """The typed :class:`Config` of a saved run (any version of the layout: :func:`migrate`)."""
    return config_from_dict(migrate(d))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict ``base`` updated by ``override`` (sections merged key by key)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def resolve(preset: str | None = None, file: str | Path | None = None,
            overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults <- preset <- YAML file <- overrides (e.g. command-line flags)."""
    d = Config().to_dict()
    file_d: dict[str, Any] = migrate(load_yaml(file)) if file else {}
    preset = preset or file_d.get("preset") or "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    d = merge(d, PRESETS[preset])
    d = merge(d, file_d)
    d = merge(d, overrides or {})
    d["preset"] = preset
    if d["size"]["rule"] == "auto" and d["size"].get("images") is None:
        given = {f"{sec}.{key}" for src in (file_d, overrides or {}) for sec, keys in src.items()
                 if isinstance(keys, dict) for key in keys}
        cfg = config_from_dict(d)
        return dataclasses.replace(cfg, size=dataclasses.replace(
            cfg.size, pinned=",".join(sorted((given & set(SIZED_KEYS)) | cfg.size.pinned_keys))))
    return config_from_dict(d)


def apply_size_rule(cfg: Config, n: int) -> tuple[Config, str | None]:
    """``cfg`` with the size rule's values for ``n`` images in the settings the user did not
    set, and a line saying what was chosen (``None`` when the rule is off or was applied
    already: a resumed run keeps its values)."""
    if cfg.size.rule != "auto" or cfg.size.images is not None:
        return cfg, None
    pinned = cfg.size.pinned_keys
    batch = cfg.optim.batch_size if "optim.batch_size" in pinned else None
    d = cfg.to_dict()
    chosen, kept = [], []
    fmt = lambda value: f"{value:g}" if isinstance(value, float) else str(value)  # noqa: E731
    for section, values in size_rule(n, batch).items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name == "cluster.feature" and value == "backbone" and d["optim"]["head"] == "centroids":
                kept.append(f"{name} {d[section][key]} (rule: backbone; optim.head centroids scores fc7)")
            elif name not in pinned:
                d[section][key] = value
                chosen.append(f"{key} {fmt(value)}")
            else:  # the user's value, and the rule's beside it
                kept.append(f"{name} {fmt(d[section][key])} (rule: {fmt(value)})")
    d["size"]["images"] = n
    note = (f"size rule ({describe(n)}): {', '.join(chosen) or 'nothing'} chosen from N"
            + (f"; kept as you set them: {', '.join(sorted(kept))}" if kept else ""))
    return config_from_dict(d), note


def validate(cfg: Config) -> None:
    """Range checks that types cannot express; each failure names the key."""
    checks = [
        (cfg.cluster.k >= 1, "cluster.k must be >= 1"),
        (cfg.cluster.pca_dim >= 1, "cluster.pca_dim must be >= 1"),
        (cfg.cluster.niter >= 1, "cluster.niter must be >= 1"),
        (cfg.cluster.whiten_eps > 0, "cluster.whiten_eps must be > 0"),
        (cfg.cluster.clusterings >= 1, "cluster.clusterings must be >= 1"),
        (cfg.cluster.clusterings == 1 or cfg.cluster.method == "kmeans",
         "cluster.clusterings > 1 needs cluster.method kmeans (PIC has no seed to vary)"),
        (cfg.cluster.method in ("kmeans", "pic"), f"cluster.method must be kmeans or pic, got {cfg.cluster.method!r}"),
        (cfg.cluster.backend in ("faiss", "faiss-gpu", "torch"), f"cluster.backend must be faiss, faiss-gpu or torch, got {cfg.cluster.backend!r}"),
        (cfg.cluster.pic_sigma > 0, "cluster.pic_sigma must be > 0"),
        (cfg.optim.epochs >= 1, "optim.epochs must be >= 1"),
        (cfg.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.lr_schedule in ("constant", "cosine"), f"optim.lr_schedule must be constant or cosine, got {cfg.optim.lr_schedule!r}"),
        (cfg.optim.balance in ("sampler", "weight", "none"), f"optim.balance must be sampler, weight or none, got {cfg.optim.balance!r}"),
        (0 < cfg.augment.crop_scale[0] <= cfg.augment.crop_scale[1] <= 1, "augment.crop_scale must satisfy 0 < min <= max <= 1"),
        (0 <= cfg.augment.affine <= 4, "augment.affine must be in [0, 4]"),
        (0 <= cfg.augment.erasing <= 1, "augment.erasing must be in [0, 1]"),
        (0 <= cfg.augment.jitter <= 2.5, "augment.jitter must be in [0, 2.5]"),
        (0 <= cfg.augment.blur <= 1, "augment.blur must be in [0, 1]"),
        (cfg.augment.crops >= 1, "augment.crops must be >= 1"),
        (cfg.optim.head in ("random", "matched", "centroids"), "optim.head must be random, matched or centroids"),
        (cfg.cluster.bn in ("running", "recompute"), f"cluster.bn must be running or recompute, got {cfg.cluster.bn!r}"),
        (cfg.cluster.feature in ("fc7", "backbone", "projection"),
         f"cluster.feature must be fc7, backbone or projection, got {cfg.cluster.feature!r}"),
        (cfg.model.projection_dim >= 1, "model.projection_dim must be >= 1"),
        (cfg.optim.temperature > 0, "optim.temperature must be > 0"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (cfg.run.workers >= 0, "run.workers must be >= 0"),
        (cfg.run.keep_every >= 0, "run.keep_every must be >= 0 (0: no snapshots)"),
        (cfg.run.keep_last >= 0, "run.keep_last must be >= 0 (0: keep every snapshot)"),
        (cfg.cluster.feature_dtype in ("float32", "float16"), f"cluster.feature_dtype must be float32 or float16, got {cfg.cluster.feature_dtype!r}"),
        (cfg.cluster.pca_sample is None or cfg.cluster.pca_sample >= 2, "cluster.pca_sample must be >= 2 (or null: automatic)"),
        (cfg.run.amp in ("none", "bf16", "fp16", "auto"), f"run.amp must be none, bf16, fp16 or auto, got {cfg.run.amp!r}"),
        (cfg.run.dist_timeout > 0, "run.dist_timeout must be > 0 seconds"),
        (cfg.run.device.split(":")[0] in ("cpu", "cuda"), f"run.device must be cpu or cuda, got {cfg.run.device!r}"),
        (cfg.data.subset is None or cfg.data.subset >= 1, "data.subset must be >= 1"),
        (cfg.data.image_size is None or cfg.data.image_size >= 16,
         f"data.image_size must be >= 16 (or omitted: per data set), got {cfg.data.image_size}"),
        (cfg.size.rule in ("off", "auto"), f"size.rule must be off or auto, got {cfg.size.rule!r}"),
        (cfg.size.images is None or cfg.size.images >= 1, "size.images must be >= 1 (or null: not chosen yet)"),
        (cfg.data.labels in LABELS, f"data.labels must be {' or '.join(LABELS)}, got {cfg.data.labels!r}"),
        (cfg.model.fc_dim is None or cfg.model.fc_dim >= 1,
         f"model.fc_dim must be >= 1 (or omitted: per architecture), got {cfg.model.fc_dim}"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; expected a YAML file (e.g. {p / 'config.yaml'})")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return d


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` to ``path`` atomically (a run resumes from this file: never half-written)."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
