"""Graph passes: the `Pass` API, the registry, the manager, and the built-in passes (one module per family)."""

from llmcompress.passes.base import NoOptions, Pass, PassContext, PassResult
from llmcompress.passes.manager import PassManager, PassRecord
from llmcompress.passes.registry import ENTRY_POINT_GROUP, get_pass, load_plugins, register_pass, registered_passes

__all__ = [
    "ENTRY_POINT_GROUP", "NoOptions", "Pass", "PassContext", "PassManager", "PassRecord", "PassResult",
    "get_pass", "load_plugins", "register_pass", "registered_passes",
]
