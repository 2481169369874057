"""Errors raised by peft-pat. Each message names the problem and the fix.

All of them subclass ``ValueError`` or ``TypeError`` so code that already catches those keeps
working, and :class:`PATError` so callers can catch everything from this package at once.
"""

from __future__ import annotations


class PATError(Exception):
    """Base class of every error peft-pat raises on purpose."""


class PATConfigError(PATError, ValueError):
    """A `PATConfig` value is invalid or cannot be met by the model it is applied to."""


class UnsupportedModelError(PATError, ValueError):
    """The base model's family (or form, e.g. quantized) cannot be pruned by PAT."""


class AdapterMismatchError(PATError, ValueError):
    """A saved PAT adapter does not fit the base model it is being loaded onto."""


class PATStateError(PATError, ValueError):
    """An operation was called in a state that does not allow it (e.g. merging twice)."""


class PATTypeError(PATError, TypeError):
    """An argument has the wrong type."""


class CheckpointError(PATError, ValueError):
    """A checkpoint or adapter folder lacks a file an operation needs, or holds one in an unexpected form."""
