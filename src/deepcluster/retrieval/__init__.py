"""Instance retrieval and image search: R-MAC / MAC / SPoC descriptors of a conv map
(the paper's Table 4 protocol), the Oxford/Paris ground truth, and a faiss image index."""

from .descriptors import (SCALES, conv_map_fn, last_conv_layer, mac, multiscale, regional_descriptors, rmac,
                          rmac_regions, spoc)

__all__ = ["SCALES", "conv_map_fn", "last_conv_layer", "mac", "multiscale", "regional_descriptors", "rmac",
           "rmac_regions", "spoc"]
