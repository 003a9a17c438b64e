"""Clustering of feature arrays: PCA-whitening, k-means with the paper's empty-cluster
rule, and PIC (arrays in, assignments out; nothing here knows about models or data)."""

from .kmeans import BACKENDS, KMeansResult, kmeans, split_empty_clusters
from .pic import PICResult, knn_graph, run_pic
from .preprocess import PCAWhitening, l2_normalize

__all__ = ["BACKENDS", "KMeansResult", "PCAWhitening", "PICResult", "kmeans", "knn_graph", "l2_normalize",
           "run_pic", "split_empty_clusters"]
