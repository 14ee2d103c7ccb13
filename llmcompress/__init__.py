"""llmcompress: a plugin-based torch.compile backend that compresses and lowers LLM graphs.

Use it by name, no import needed: ``torch.compile(model, backend="llmcompress", options={...})``.
Write passes with `Pass` and `register_pass` (see README, "Writing a pass plugin").
"""

from __future__ import annotations

from llmcompress import kernels as _kernels  # noqa: F401 - registers the llmcompress:: custom ops
from llmcompress._logging import configure_from_env as _configure_logging
from llmcompress.backend.entry import llmcompress_backend
from llmcompress.backend.entry import register as _register_backend
from llmcompress.config import CompileConfig
from llmcompress.errors import (
                     LLMCompressError,
                     OptionError,
                     PassFailedError,
                     PassOrderError,
                     RecipeError,
                     VerificationError,
                     WeightReleasedError,
)
from llmcompress.kernels.moe_load_counters import moe_load_counters, reset_moe_load_counters
from llmcompress.passes import Pass, PassContext, PassManager, PassResult, get_pass, register_pass, registered_passes
from llmcompress.recipes import builtin_recipes, load_recipe
from llmcompress.speculative import SelfSpeculativeDecoding, self_speculative_generate
from llmcompress.version import __version__

_configure_logging()
_register_backend()

__all__ = [
    "CompileConfig", "LLMCompressError", "OptionError", "Pass", "PassContext", "PassFailedError", "PassManager",
    "PassOrderError", "PassResult", "RecipeError", "SelfSpeculativeDecoding", "VerificationError",
    "WeightReleasedError", "__version__", "builtin_recipes", "get_pass", "llmcompress_backend", "load_recipe",
    "moe_load_counters", "register_pass", "registered_passes", "reset_moe_load_counters", "self_speculative_generate",
]
