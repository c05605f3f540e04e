"""``compression.json``: the plan of a compressed model folder, read without importing any model code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .manifest import read_json_object

PLAN_FILE = "compression.json"
PLAN_FORMAT = "fwsvd-deploy/compressed-model"
PLAN_VERSION = 2  # 2: layers may name a ``shared_down`` (joint q/k/v); plans without one are still written as 1


def is_compressed(folder: str | Path) -> bool:
    """Whether ``folder`` holds a compressed model (a plan beside the weights)."""
    return (Path(folder) / PLAN_FILE).is_file()


def read_plan(folder: str | Path) -> dict[str, Any]:
    """The plan of a compressed folder.

    Raises:
        ModelLoadError: when the file cannot be read or is not a JSON object.
    """
    return read_json_object(Path(folder) / PLAN_FILE, ModelLoadError, "it must be the plan save_compressed writes")
