"""Instance retrieval and image search: R-MAC / MAC / SPoC descriptors of a conv map
(the paper's Table 4 protocol), the Oxford/Paris ground truth, and a faiss image index."""

from .descriptors import (SCALES, conv_map_fn, last_conv_layer, mac, multiscale, multiscale_many, multiscale_regions,
                          regional_descriptors, rmac, rmac_regions, spoc)
from .evaluate import labelled_map, score_retrieval, trapezoid_ap
from .groundtruth import (GroundTruth, GroundTruthError, GroundTruthUnpickler, crop_query, load_classic,
                          load_ground_truth, load_revisited, parse_revisited, safe_unpickle)
from .index import (FLAT_LIMIT, ImageIndex, ImageIndexError, IndexMeta, build_index, check_meta, file_stats,
                    load_index, model_fingerprint, near_duplicates, remove, save_index, search, stale_paths, update)

__all__ = ["FLAT_LIMIT", "SCALES", "GroundTruth", "GroundTruthError", "GroundTruthUnpickler", "ImageIndex",
           "ImageIndexError", "IndexMeta", "build_index", "check_meta", "conv_map_fn", "crop_query", "file_stats",
           "last_conv_layer", "load_classic", "load_ground_truth", "load_index", "load_revisited", "mac",
           "model_fingerprint", "multiscale", "multiscale_many", "multiscale_regions", "near_duplicates", "parse_revisited",
           "regional_descriptors", "remove", "rmac", "rmac_regions", "safe_unpickle", "save_index", "score_retrieval",
           "search", "spoc", "stale_paths", "trapezoid_ap", "update", "labelled_map"]
