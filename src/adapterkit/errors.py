"""Exceptions raised by adapterkit.

Every message names what was wrong and what to do about it. ``AdapterError`` subclasses
``ValueError`` so that callers catching ``ValueError`` for bad input keep working.
"""


class AdapterError(ValueError):
    """Bad input to an adapterkit call: an unknown name or option, sizes that do not fit, ..."""


class CheckpointError(AdapterError):
    """A checkpoint that cannot be loaded: missing, corrupt, truncated or made for another base."""
