"""Instance retrieval and image search: R-MAC / MAC / SPoC descriptors of a conv map
(the paper's Table 4 protocol), the Oxford/Paris ground truth, and a faiss image index."""

from .descriptors import (SCALES, conv_map_fn, last_conv_layer, mac, multiscale, regional_descriptors, rmac,
                          rmac_regions, spoc)
from .groundtruth import (GroundTruth, GroundTruthError, GroundTruthUnpickler, crop_query, load_classic,
                          load_ground_truth, load_revisited, parse_revisited, safe_unpickle)

__all__ = ["SCALES", "GroundTruth", "GroundTruthError", "GroundTruthUnpickler", "conv_map_fn", "crop_query",
           "last_conv_layer", "load_classic", "load_ground_truth", "load_revisited", "mac", "multiscale",
           "parse_revisited", "regional_descriptors", "rmac", "rmac_regions", "safe_unpickle", "spoc"]
