"""The one error hierarchy of normfold.

Every message says what was seen, what was expected and, where it helps, what to try. The CLI maps
:class:`UsageError` subclasses to exit code 2 and :class:`BackendUnavailableError` to exit code 3.
"""

from __future__ import annotations


class NormfoldError(Exception):
    """Base class of every error normfold raises on purpose."""

    exit_code: int = 2


class UsageError(NormfoldError):
    """Bad input from the user: a path, a reference, a shape, a flag."""


class ModelLoadError(UsageError):
    """A model reference or weights file could not be resolved or loaded."""


class InputSpecError(UsageError):
    """A malformed ``--input`` spec or an inputs file that does not fit the model."""


class ExportError(NormfoldError):
    """torch → ONNX export failed or produced something other than what was asked for."""


class OnnxLoadError(UsageError):
    """An ONNX file is missing, unreadable or invalid."""


class FusionError(NormfoldError):
    """A graph pass failed, or its verification showed it changed the numbers."""


class ConfigError(UsageError):
    """A gate config file is missing, malformed or has an unknown key."""


class BackendUnavailableError(NormfoldError):
    """A backend that was explicitly requested cannot run here; the message says exactly why."""

    exit_code = 3


class UnknownBackendError(UsageError):
    """A backend name that normfold does not know."""


class NumericMismatchError(NormfoldError):
    """Outputs differ beyond tolerance where the caller asked for an exception instead of a report."""

    exit_code = 1


class ModelCodeError(UsageError):
    """The user's model code (factory, ``forward``, weights loading) exited the process or raised something
    that is not an ``Exception``; the guard in :mod:`normfold.models.guard` turns it into this one-line error."""


class OutputPathError(UsageError):
    """An output destination that cannot be written: a read-only folder, a file where a folder is needed,
    or one of the command's own inputs."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt`` so every ``finally`` (atomic
    writers, temporary folders, worker processes) cleans up the same way; the CLI exits 143 on it."""
