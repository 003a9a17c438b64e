"""Figures: functions returning matplotlib figures or image arrays."""

from .curves import plot_nmi, save_figure

__all__ = ["plot_nmi", "save_figure"]
