"""Analyses that passes read through `PassContext`: hardware descriptions now, the roofline cost model next."""

from llmcompress.cost.hardware import HARDWARE, Hardware, resolve

__all__ = ["HARDWARE", "Hardware", "resolve"]
