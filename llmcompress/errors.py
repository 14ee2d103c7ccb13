"""Every error llmcompress raises on purpose derives from `LLMCompressError`."""

from __future__ import annotations

from collections.abc import Iterable


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


def did_you_mean(name: object, allowed: Iterable[object]) -> str:
    """" (did you mean 'w4a16-gptq'?)" when `name` is a likely misspelling of one or two of `allowed`, else "".

    For every message that rejects a name (recipe, pass, option key or value, hardware, CLI verb): the message still
    lists everything allowed; this only points at the likely one. difflib's ratio cutoff 0.6 (its default) matches
    two swapped letters in "w4a16-gtpq" (0.9) and not unrelated names.
    """
    import difflib

    choices = {str(a): a for a in allowed}
    close = difflib.get_close_matches(str(name), list(choices), n=2, cutoff=0.6)
    if not close or str(name) in choices:
        return ""
    # A second name only when about as close as the first ("h100" -> h100-sxm, h200; not "w4a16-gtpq" -> w4a16-awq).
    ratio = [difflib.SequenceMatcher(None, str(name), c).ratio() for c in close]
    close = [c for c, r in zip(close, ratio) if r >= ratio[0] - 0.1]
    return f" (did you mean {' or '.join(repr(choices[c]) for c in close)}?)"
