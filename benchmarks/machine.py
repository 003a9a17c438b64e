"""Machine facts recorded next to every benchmark result (the package's own record)."""

from deepcluster.machine import machine_info, machine_line

__all__ = ["machine_info", "machine_line"]
