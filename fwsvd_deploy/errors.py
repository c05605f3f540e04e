"""Exceptions raised by fwsvd-deploy.

Every error a user can cause derives from :class:`FwsvdError`; the CLI turns these into one line on
stderr and exit code 2. :class:`GateFailedError` is the one exception that means "the checks ran and
the candidate failed" and maps to exit code 1.
"""

from __future__ import annotations


class FwsvdError(Exception):
    """Base class: a problem with the user's input, configuration or environment."""

    exit_code = 2


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


class GateFailedError(FwsvdError):
    """Checks ran and at least one failed."""

    exit_code = 1


class ExportError(FwsvdError):
    """An ONNX export or optimisation could not produce a valid graph."""


class ParityError(FwsvdError):
    """Two models that must agree do not, beyond the tolerance."""


class DeviceUnavailableError(FwsvdError):
    """The requested execution provider or device is not present on this machine."""
