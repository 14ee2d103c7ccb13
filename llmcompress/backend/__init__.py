"""The backend: what Dynamo calls (`entry.py`), the ordered stages of one graph (`pipeline.py`), capture, lowering,
verification and the compile report."""

from llmcompress.backend.entry import llmcompress_backend, make_backend
from llmcompress.backend.pipeline import GraphHook

__all__ = ["GraphHook", "llmcompress_backend", "make_backend"]
