"""Errors that mean "the user asked for something wrong", as opposed to a bug.

They subclass the built-in types a caller expects (``ValueError``, ``FileNotFoundError``), and
the CLI prints exactly these as one line with no traceback. Every message says what is wrong
and what to do about it.
"""


class LatentDiffusionError(Exception):
    """Base of the user-facing errors."""


class InvalidInputError(LatentDiffusionError, ValueError):
    """An argument or a file's content is not acceptable."""


class MissingFileError(LatentDiffusionError, FileNotFoundError):
    """A file or folder the user named (or that a model folder needs) does not exist."""


class NonFiniteResultError(LatentDiffusionError, FloatingPointError):
    """A call's arithmetic produced NaN or inf (extreme settings, broken weights): no image is made."""
