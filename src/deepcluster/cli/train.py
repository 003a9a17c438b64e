"""``deepcluster train``: configuration resolved once (defaults <- --preset <-
--config FILE.yaml <- flags) and passed down as a typed :class:`~deepcluster.config.Config`."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import LABELS, PRESETS, Config, merge, resolve
from ..sizing import SIZED_KEYS, rule_text

logger = logging.getLogger("deepcluster")

# flag -> (section, key); a flag left at None does not override the file/preset.
TRAIN_FLAGS: dict[str, tuple[str, str]] = {
    "data": ("data", "name"), "data_root": ("data", "root"), "split": ("data", "split"),
    "image_size": ("data", "image_size"), "subset": ("data", "subset"), "labels": ("data", "labels"),
    "arch": ("model", "arch"), "sobel": ("model", "sobel"), "width": ("model", "width"), "fc_dim": ("model", "fc_dim"),
    "projection_dim": ("model", "projection_dim"),
    "clustering": ("cluster", "method"), "k": ("cluster", "k"), "pca_dim": ("cluster", "pca_dim"),
    "kmeans": ("cluster", "backend"), "kmeans_iters": ("cluster", "niter"), "pca_sample": ("cluster", "pca_sample"),
    "pic_sigma": ("cluster", "pic_sigma"), "cluster_feature": ("cluster", "feature"),
    "clusterings": ("cluster", "clusterings"),
    "epochs": ("optim", "epochs"), "batch_size": ("optim", "batch_size"), "lr": ("optim", "lr"),
    "lr_schedule": ("optim", "lr_schedule"), "momentum": ("optim", "momentum"), "weight_decay": ("optim", "weight_decay"), "balance": ("optim", "balance"),
    "output_dir": ("run", "output_dir"), "device": ("run", "device"), "seed": ("run", "seed"),
    "workers": ("run", "workers"), "deterministic": ("run", "deterministic"), "resume": ("run", "resume"),
    "eval_every": ("run", "eval_every"), "tensorboard": ("run", "tensorboard"),
    "keep_every": ("run", "keep_every"), "keep_last": ("run", "keep_last"),
    "stop_when_worse": ("run", "stop_when_worse"),
    "feature_dtype": ("cluster", "feature_dtype"), "amp": ("run", "amp"), "channels_last": ("run", "channels_last"),
    "crop_scale": ("augment", "crop_scale"), "hflip": ("augment", "hflip"), "affine": ("augment", "affine"),
    "erasing": ("augment", "erasing"), "whiten": ("cluster", "whiten"), "whiten_eps": ("cluster", "whiten_eps"),
    "jitter": ("augment", "jitter"), "blur": ("augment", "blur"), "bn": ("cluster", "bn"), "crops": ("augment", "crops"),
    "head": ("optim", "head"), "temperature": ("optim", "temperature"), "dropout": ("model", "dropout"),
    "sync_bn": ("run", "sync_bn"), "dist_timeout": ("run", "dist_timeout"),
}


def _config_value(section: str, key: str, preset: str) -> Any:
    """The value of ``section.key`` under ``preset`` (the defaults with its overrides)."""
    return PRESETS[preset].get(section, {}).get(key, getattr(getattr(Config(), section), key))


def _show(value: Any, action: argparse.Action) -> str:
    """A config value as ``--help`` prints it: on/off for switches, ``g`` format for numbers."""
    if isinstance(action, argparse._StoreConstAction):
        return "on" if value == action.const else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v, action) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class ConfigDefaultsFormatter(argparse.HelpFormatter):
    """Appends to each flag of :data:`TRAIN_FLAGS` its default from the config dataclasses
    (preset ``paper``), and each other preset's value where it differs, e.g.
    ``(default: 5; small-images: 48)``. The flags themselves default to ``None`` so that a
    config file and a preset apply; a ``None`` default (automatic) is explained by the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.dest not in TRAIN_FLAGS:
            return text
        section, key = TRAIN_FLAGS[action.dest]
        default = _config_value(section, key, "paper")
        if default is None:
            return text
        paper = _show(default, action)
        others = {name: _show(_config_value(section, key, name), action) for name in sorted(PRESETS) if name != "paper"}
        for name in others:
            if PRESETS[name].get("size", {}).get("rule") == "auto" and f"{section}.{key}" in SIZED_KEYS:
                others[name] = "from the number of images, see --preset"
        shown = [f"default: {paper}"] + [f"{name}: {value}" for name, value in others.items() if value != paper]
        return f"{text} ({'; '.join(shown)})".lstrip()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train DeepCluster", description="Train DeepCluster: alternate k-means on the "
                       "network's features and training on the cluster assignments. The defaults shown are the paper's "
                       "settings (--preset paper) and where another preset differs, its value.",
                       formatter_class=ConfigDefaultsFormatter)
    add_train_flags(p)
    p.set_defaults(func=cmd_train)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--preset`` and every flag of :data:`TRAIN_FLAGS` (``train``, and
    ``sweep``, which trains one run per value of ``--k``)."""
    p.add_argument("--config", help="YAML file with sections data/model/cluster/optim/run (flags override it)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named set of defaults: paper (the paper's settings, default) or small-images "
                        "(experiments/ABLATION.md; tuned on 60,000 images, and on N images it chooses k, the PCA "
                        f"dimensions, the batch, the learning rate and the epochs from N: {rule_text()}; flags you "
                        "give are kept; the values chosen are logged and written to config.yaml; docs/RESULTS.md)")
    _data_and_model_flags(p)
    _clustering_flags(p)
    _optimisation_flags(p)
    _run_flags(p)


class LazyChoices(Sequence):
    """The list ``fn()`` returns, computed on first use: ``choices=`` of a flag whose list
    lives in a module that imports torch (seconds), so that building the parser (every
    ``deepcluster`` command, ``--version``) does not import it."""

    def __init__(self, fn: Callable[[], Sequence[str]]) -> None:
        self._fn, self._items = fn, None

    def _get(self) -> list[str]:
        if self._items is None:
            self._items = list(self._fn())
        return self._items

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def _datasets() -> Sequence[str]:
    from ..data import DATASETS

    return DATASETS


def _models() -> list[str]:
    from ..models import list_models

    return list_models()


def _data_and_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=LazyChoices(_datasets), help="the data set (folder: --data-root, a folder of images)")
    g.add_argument("--data-root", help="folder of the data set's files (required for folder/cifar10/stl10)")
    g.add_argument("--split", help="split to train on: train or test (stl10 also unlabeled, train+unlabeled); "
                   "ignored for a folder")
    g.add_argument("--labels", choices=LABELS, help="folders: an ImageFolder tree's class sub-folders are its labels "
                   "(analysis only: NMI vs labels, evaluations); none: no labels, sub-folders such as photos/2019-01 "
                   "are only where the images are kept")
    g.add_argument("--image-size", type=int, help="network input side, >= 16 (default per data set: 28 for "
                   "Fashion-MNIST; for a folder the median shorter side of its images, within 28..224)")
    g.add_argument("--subset", type=int, help="use a fixed random subset of this many images (quick runs)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=LazyChoices(_models), help="alexnet_small: 28-64 px; alexnet, vgg16: 224 px")
    g.add_argument("--no-sobel", dest="sobel", action="store_const", const=False, help="feed raw RGB instead of Sobel")
    g.add_argument("--width", type=float, help="alexnet_small channel multiplier (default 0.5)")
    g.add_argument("--fc-dim", type=int, help="width of fc6/fc7, >= 1 (default 4096 for alexnet/vgg16, 1024 for "
                   "alexnet_small)")
    g.add_argument("--dropout", type=float, help="dropout before fc6 and fc7")
    g.add_argument("--projection-dim", type=int,
                   help="width of the L2-normalised projection of --cluster-feature projection")


def _clustering_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clustering")
    g.add_argument("--clustering", choices=["kmeans", "pic"], help="k-means or Power Iteration Clustering")
    g.add_argument("--k", type=int, help="number of clusters; some over-segmentation helps (paper: 10k on ImageNet)")
    g.add_argument("--pca-dim", type=int, help="PCA dimension before clustering")
    g.add_argument("--no-whiten", dest="whiten", action="store_const", const=False,
                   help="PCA without whitening (paper: whitened)")
    g.add_argument("--whiten-eps", type=float,
                   help="regularised whitening: components divided by sqrt(eigenvalue + EPS x the largest); "
                        "1e-6 whitens fully (paper); larger values keep weak directions damped")
    g.add_argument("--cluster-feature", choices=["fc7", "backbone", "projection"],
                   help="what is clustered: fc7 (paper), backbone (the conv stack output, fc6's input) or "
                        "projection (DeepCluster-v2: a trained linear projection of ReLU(fc7), L2-normalised, "
                        "read by the head)")
    g.add_argument("--kmeans", choices=["faiss", "faiss-gpu", "torch"], help="k-means backend")
    g.add_argument("--kmeans-iters", type=int, help="Lloyd iterations")
    g.add_argument("--clusterings", type=int, help="k-means runs per epoch (own seed, own new head each; the loss "
                   "averages the heads: DeepCluster-v2)")
    g.add_argument("--pca-sample", type=int, help="images used to fit the PCA (default: all when N x fc_dim floats "
                   "fit in 1 GB, else max(20 x fc_dim, 50000)); the rest are projected batch by batch")
    g.add_argument("--feature-dtype", choices=["float32", "float16"],
                   help="storage of the N x pca_dim features before k-means (float16 halves it)")
    g.add_argument("--pic-sigma", type=float, help="PIC Gaussian bandwidth")
    g.add_argument("--bn", choices=["running", "recompute"],
                   help="batch-norm statistics of the features clustered: running (accumulated in training) or recomputed each "
                        "epoch on the un-augmented views of up to 10,000 images")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs, each one clustering and one pass of training (paper: 500 "
                   "on ImageNet)")
    g.add_argument("--batch-size", type=int, help="images per SGD step (summed over processes under torchrun)")
    g.add_argument("--lr", type=float, help="SGD learning rate (constant unless --lr-schedule cosine)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (paper) or cosine decay over the epochs, one value per epoch")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, help="SGD weight decay (L2 penalty)")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the random resized crop")
    g.add_argument("--no-hflip", dest="hflip", action="store_const", const=False, help="no random horizontal flips")
    g.add_argument("--affine", type=float, help="random affine warp strength (0 off; 1: 15 deg, 10%% shift, 10 deg shear)")
    g.add_argument("--erasing", type=float, help="random erasing probability (0 off)")
    g.add_argument("--jitter", type=float, help="colour-jitter strength (0 off; 1: brightness/contrast/saturation "
                   "+-40%%, applied with probability 0.8)")
    g.add_argument("--crops", type=int, help="augmented views of each image per step, all on its pseudo-label "
                   "(multi-crop at one resolution)")
    g.add_argument("--blur", type=float, help="Gaussian-blur probability (0 off; kernel about 10%% of the side)")
    g.add_argument("--head", choices=["random", "matched", "centroids"],
                   help="classifier trained each epoch: a new random linear layer (paper), the previous epoch's "
                        "with its rows moved to the matching new clusters, or the k-means centroids, fixed "
                        "(DeepCluster-v2)")
    g.add_argument("--temperature", type=float, help="softmax temperature of --head centroids and of the random "
                   "head on a projection")
    g.add_argument("--balance", choices=["sampler", "weight", "none"],
                   help="against trivial parametrisation: uniform sampling over clusters (paper), loss weights or none")


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="run directory (config.yaml, metrics.jsonl, checkpoint.pt, ...)")
    g.add_argument("--device", help="cpu or cuda")
    g.add_argument("--seed", type=int, help="every epoch's randomness (clustering, sampling, augmentation) derives "
                   "from (seed, epoch)")
    g.add_argument("--workers", type=int, help="data-loading worker processes")
    g.add_argument("--deterministic", action="store_const", const=True, help="deterministic kernels: exact resume")
    g.add_argument("--resume", action="store_const", const=True,
                   help="continue the run in --output-dir (its config.yaml is the base; flags override it)")
    g.add_argument("--eval-every", type=int, help="kNN probe on a held-out part every N epochs; the best epoch by it "
                   "is kept as best.pt (labelled data sets only)")
    g.add_argument("--keep-every", type=int, help="keep checkpoint-epochE.pt every N epochs beside checkpoint.pt "
                   "(for eval/report/export/assign --epoch E; 0: none)")
    g.add_argument("--stop-when-worse", action="store_const", const=True,
                   help="stop after an epoch whose label-free check warns: the features' effective rank (RankMe, "
                        "logged as rankme) fell below 5%% of the random network's")
    g.add_argument("--keep-last", type=int, help="keep at most the M newest checkpoint-epochE.pt (0: all)")
    g.add_argument("--tensorboard", action="store_const", const=True, help="write TensorBoard scalars and images")
    g = p.add_argument_group("scale-out (launch with torchrun --nproc-per-node G -m deepcluster train ...)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"],
                   help="mixed precision: bf16 (about 2x faster on CPUs with AVX512-BF16, and on recent GPUs), fp16 "
                        "(CUDA only, with a grad scaler), auto (bf16 where native, else float32)")
    g.add_argument("--channels-last", action="store_const", const=True,
                   help="channels_last memory format (faster convolutions on GPU and CPU)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   help="contiguous memory format instead of channels_last")
    g.add_argument("--sync-bn", action="store_const", const=True,
                   help="synchronise batch-norm statistics across GPUs (CUDA only; helps with small per-GPU batches)")
    g.add_argument("--dist-timeout", type=float,
                   help="seconds a collective waits for the other ranks before failing")


def flags_to_overrides(args: argparse.Namespace, table: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in table.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from ..monitor import default_callbacks
    from ..train import train

    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun only rank 0 talks on the console; the others log to their own
        # file in the run directory (train.rank<N>.log, debug level).
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    overrides = flags_to_overrides(args, TRAIN_FLAGS)
    config_file, preset = args.config, args.preset
    out = overrides.get("run", {}).get("output_dir")
    if args.resume and not config_file and out:
        if (Path(out) / "config.yaml").exists():
            config_file = str(Path(out) / "config.yaml")  # resume with the run's own settings
        elif (Path(out) / "checkpoint.pt").exists():  # config.yaml lost: the checkpoint holds the settings too
            from ..checkpoint import load_checkpoint, saved_config

            saved = saved_config(load_checkpoint(Path(out) / "checkpoint.pt")).to_dict()
            preset = preset or saved.pop("preset")
            overrides = merge(saved, overrides)
    cfg = resolve(preset, config_file, overrides)
    train(cfg, callbacks=default_callbacks(cfg))
    logger.info("done: %s (metrics.jsonl, nmi.png, checkpoint.pt)", cfg.run.output_dir)
    return 0
