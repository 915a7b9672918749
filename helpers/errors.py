"""Exceptions raised by esma.

Every error about user input names the offending file (or config key, or subject and column) and
what was wrong with it.  All inherit from :class:`EsmaError`; the input errors also subclass
:class:`ValueError` so callers that catch the built-in keep working (the nibabel ``AffineError``
pattern).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
    "EsmaError",
    "GeometryMismatchError",
    "InputFileError",
    "LabelError",
    "ModelError",
    "OutputError",
]


class EsmaError(Exception):
    """Base class of every error esma raises on purpose."""


class InputFileError(EsmaError, ValueError):
    """An input file is unreadable or its content is unusable.

    Parameters
    ----------
    path : str or Path
        The offending file.
    problem : str
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class GeometryMismatchError(InputFileError):
    """Image and mask (or two images) do not lie on the same voxel grid."""


class LabelError(InputFileError):
    """A label file is malformed, or a mask holds values the label file does not declare."""


class ModelError(InputFileError):
    """A segmentation model is missing, corrupt or does not fit the input."""


class ConfigError(EsmaError, ValueError):
    """A study configuration is invalid; the message names the key and the problem."""


class OutputError(EsmaError, OSError):
    """An output could not be written (unwritable folder, full disk, ...)."""
