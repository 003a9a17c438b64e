"""Figures: functions returning matplotlib figures or image arrays.

- ``curves``: training curves from ``metrics.jsonl`` (NMI, losses, sizes, timings).
- ``filters``: first-layer filters as a picture grid.
- ``activations``: one forward pass over sample images; top-activating images.
- ``synthesis``: images synthesised by gradient ascent to maximise a filter.
- ``neighbors``: nearest-neighbour queries, random vs trained network.
- ``clusters``: contact sheets of clusters with purity.
- ``images``: grids, un-normalising, PNG files.
- ``run``: reading a run directory (model, images, metrics, assignments).
"""

from .curves import (plot_cluster_sizes, plot_losses, plot_nmi, plot_size_histogram, plot_timings,
                     save_figure)

__all__ = ["plot_cluster_sizes", "plot_losses", "plot_nmi", "plot_size_histogram", "plot_timings",
           "save_figure"]
