"""Clustering of feature arrays: PCA-whitening, k-means with the paper's empty-cluster
rule, PIC, and the final stage into K groups (arrays in, assignments out; nothing here
knows about models or data)."""

from .final import (FINAL_METHODS, FinalClusteringError, FinalClusters, MissingDependencyError,
                    final_clustering)
from .kmeans import BACKENDS, KMeansResult, faiss_has_gpu, kmeans, split_empty_clusters
from .pic import PICResult, knn_graph, run_pic
from .preprocess import PCAWhitening, l2_normalize
from .sharded import cluster_shards
from .streaming import StreamingPCA, default_pca_sample, fit_pca_sharded, resolve_pca_sample, sample_indices

__all__ = ["BACKENDS", "FINAL_METHODS", "FinalClusteringError", "FinalClusters", "KMeansResult",
           "MissingDependencyError", "PCAWhitening", "PICResult", "StreamingPCA", "cluster_shards", "default_pca_sample",
           "faiss_has_gpu", "final_clustering", "fit_pca_sharded", "kmeans", "knn_graph", "l2_normalize",
           "resolve_pca_sample", "run_pic", "sample_indices", "split_empty_clusters"]
