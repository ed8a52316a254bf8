"""The errors recreason raises on purpose, one type per kind of failure.

The CLI prints any :class:`RecReasonError` as one clear line and exits 2; every other
exception is a bug and keeps its traceback. Each message names the file, record or field
it is about and, where there is one, what to do.
"""

from __future__ import annotations


class RecReasonError(Exception):
    """Base of the failures a user can act on."""


class ConfigError(RecReasonError, ValueError):
    """A config file, ``--set`` override or flag that is invalid (names the section and key)."""


class DataError(RecReasonError, ValueError):
    """Input data that cannot be used, with a message naming the record and field."""


class NotARun(RecReasonError, FileNotFoundError):
    """A directory that is not a training run, or a run that has no usable checkpoint yet."""


class CheckpointMismatch(RecReasonError, ValueError):
    """A checkpoint that does not fit the model, method or request (names the folder)."""


class UnknownId(RecReasonError, LookupError):
    """A user or item id that the run or service knows nothing about (the message names the field)."""


class ModelNotFound(RecReasonError, FileNotFoundError):
    """The model name does not resolve to anything available offline."""
