"""Analyses that passes read through `PassContext`: hardware descriptions now, the roofline cost model next."""

from .hardware import HARDWARE, Hardware, resolve

__all__ = ["HARDWARE", "Hardware", "resolve"]
