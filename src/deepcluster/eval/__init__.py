"""Evaluation protocols of the paper (SPEC section 2) and their baselines.

Open a context once, run any protocol on it; each writes ``<protocol>.json`` into the
checkpoint's ``eval/`` folder and returns the same dict (its ``metrics`` entry holds the
numbers the results table uses)::

    from deepcluster.eval import open_checkpoint, linear_eval, knn_eval, clusters_eval
    ctx = open_checkpoint("runs/fashion-mnist")
    linear_eval(ctx)["metrics"]      # {"linear_conv1": ..., ..., "linear_conv5": ...}
    knn_eval(ctx)["metrics"]         # {"knn": ..., "knn_weighted": ...}

See docs/EVALUATION.md for every protocol's rules (pool sizes, hyper-parameter choice).
"""

from .baselines import make_random_init, train_supervised
from .classifier import Grid, select_and_fit, train_classifier
from .clusters import cluster_scores, clusters_eval
from .context import EvalContext, machine_info, open_checkpoint, open_pixels, results_dir_for
from .features import FeatureStore, NetEncoder, PixelEncoder, default_target_dim, pool_side
from .finetune import finetune_eval
from .knn import knn_classify, knn_eval, knn_probe
from .linear import LINEAR_GRID, linear_eval
from .mlp import MLP_GRID, mlp_eval
from .splits import EvalData, balanced_label_subset, load_eval_data, stratified_holdout

__all__ = [
    "EvalContext", "EvalData", "FeatureStore", "Grid", "LINEAR_GRID", "MLP_GRID", "NetEncoder", "PixelEncoder",
    "balanced_label_subset", "cluster_scores", "clusters_eval", "default_target_dim", "finetune_eval",
    "knn_classify", "knn_eval", "knn_probe", "linear_eval", "load_eval_data", "machine_info", "make_random_init",
    "mlp_eval", "open_checkpoint", "open_pixels", "pool_side", "results_dir_for", "select_and_fit",
    "stratified_holdout", "train_classifier", "train_supervised",
]
