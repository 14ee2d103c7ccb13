"""Every error llmcompress raises on purpose derives from `LLMCompressError`."""

from __future__ import annotations


class LLMCompressError(RuntimeError):
    """Base of the errors that llmcompress raises deliberately."""


class OptionError(LLMCompressError, ValueError):
    """A compile option, pass option or recipe field has an unknown key, wrong type or bad value."""


class RecipeError(OptionError):
    """A recipe name is unknown or a recipe file is malformed."""


class PassOrderError(LLMCompressError):
    """Pass ordering constraints name an unknown pass or form a cycle."""


class PassFailedError(LLMCompressError):
    """A pass raised under `strict=True`; the cause is chained."""


class VerificationError(LLMCompressError):
    """`verify=True` found the compiled graph differs from the uncompiled one beyond tolerance."""


class WeightReleasedError(LLMCompressError):
    """A graph needs a dense weight that `release_weights=True` already freed."""


class DiskCacheWarning(UserWarning):
    """A derived-weight cache file was missing pieces, corrupt or unwritable: it is ignored (and deleted), and the
    weight is computed again."""
