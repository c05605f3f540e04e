"""Exceptions raised by fwsvd-deploy, their exit codes, and the one function that turns an exception into a line.

Every error a user can cause derives from :class:`FwsvdError`; the CLI turns these into one line on
stderr and exit code 2. :class:`GateFailedError` is the one exception that means "the checks ran and
the candidate failed" and maps to exit code 1. Anything else is an internal error (exit code 3).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class FwsvdError(Exception):
    """Base class: a problem with the user's input, configuration or environment."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(FwsvdError):
    """A configuration value is invalid or unknown."""


class DatasetError(FwsvdError):
    """A dataset cannot be found, read, or does not fit the task."""


class ModelLoadError(FwsvdError):
    """A model folder or hub id cannot be loaded."""


class NoTargetModulesError(FwsvdError):
    """No module matched the target patterns."""


class UnsupportedModuleError(FwsvdError):
    """A targeted module is of a type that cannot be factorised."""


class AlreadyCompressedError(FwsvdError):
    """A compressed model was given where an uncompressed one is expected."""


class FisherError(FwsvdError):
    """Fisher statistics are missing, mismatched or not finite."""


class OutputExistsError(FwsvdError):
    """The output folder exists and is not empty."""


class OutputPathError(FwsvdError):
    """The output path cannot be written, or would overwrite or sit inside an input."""


class GateFailedError(FwsvdError):
    """Checks ran and at least one failed."""

    exit_code = EXIT_GATE_FAILED


class ExportError(FwsvdError):
    """An ONNX export or optimisation could not produce a valid graph."""


class ParityError(FwsvdError):
    """Two models that must agree do not, beyond the tolerance, or share no output to compare."""


class FusionLossError(ExportError):
    """The optimised graph has fewer fused operators than its dense-structured reference."""


class DeviceUnavailableError(FwsvdError):
    """The requested execution provider or device is not present on this machine."""


class NumericalError(RuntimeError):
    """A computation gave NaN or inf where the inputs were finite: an internal error (exit 3), never bad input."""

    exit_code = EXIT_INTERNAL
