"""fwsvd-deploy: Fisher-weighted SVD compression of transformers models, ONNX export and validation.

The names below are imported on first use, so that ``import fwsvd_deploy`` (and the command line, before it
knows what it will do) does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    ".checkpoint": ("load_compressed", "save_compressed", "save_model"),
    ".compression": ("CalibrationStats", "CompressionReport", "FisherResult", "LayerReport", "LowRankLinear",
                     "collect_fisher", "collect_statistics", "compress", "resolve_targets"),
    ".config": ("CalibrationConfig", "CompressionConfig", "DataConfig", "FinetuneConfig", "FisherConfig",
                "PipelineConfig"),
    ".data": ("TaskData", "TaskSplits", "TextData", "lm_windows", "load_splits", "load_text", "window_batches"),
    ".errors": ("AlreadyCompressedError", "ConfigError", "DatasetError", "FisherError", "FwsvdError",
                "GateFailedError", "ModelLoadError", "NoTargetModulesError", "OutputExistsError",
                "UnsupportedModuleError"),
    ".modeling": ("load_causal_lm", "load_classifier", "load_tokenizer"),
    ".training": ("EvalResult", "FinetuneResult", "evaluate", "evaluate_lm", "finetune", "finetune_lm"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AlreadyCompressedError",
    "CalibrationConfig",
    "CalibrationStats",
    "CompressionConfig",
    "CompressionReport",
    "ConfigError",
    "DataConfig",
    "DatasetError",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "FisherConfig",
    "FisherError",
    "FisherResult",
    "FwsvdError",
    "GateFailedError",
    "LayerReport",
    "LowRankLinear",
    "ModelLoadError",
    "NoTargetModulesError",
    "OutputExistsError",
    "PipelineConfig",
    "TaskData",
    "TaskSplits",
    "TextData",
    "UnsupportedModuleError",
    "collect_fisher",
    "collect_statistics",
    "compress",
    "evaluate",
    "evaluate_lm",
    "finetune",
    "finetune_lm",
    "lm_windows",
    "load_causal_lm",
    "load_classifier",
    "load_compressed",
    "load_splits",
    "load_text",
    "load_tokenizer",
    "resolve_targets",
    "save_compressed",
    "save_model",
    "window_batches",
]

if TYPE_CHECKING:
    from .checkpoint import load_compressed, save_compressed, save_model
    from .compression import (
        CalibrationStats,
        CompressionReport,
        FisherResult,
        LayerReport,
        LowRankLinear,
        collect_fisher,
        collect_statistics,
        compress,
        resolve_targets,
    )
    from .config import (
        CalibrationConfig,
        CompressionConfig,
        DataConfig,
        FinetuneConfig,
        FisherConfig,
        PipelineConfig,
    )
    from .data import TaskData, TaskSplits, TextData, lm_windows, load_splits, load_text, window_batches
    from .errors import (
        AlreadyCompressedError,
        ConfigError,
        DatasetError,
        FisherError,
        FwsvdError,
        GateFailedError,
        ModelLoadError,
        NoTargetModulesError,
        OutputExistsError,
        UnsupportedModuleError,
    )
    from .modeling import load_causal_lm, load_classifier, load_tokenizer
    from .training import EvalResult, FinetuneResult, evaluate, evaluate_lm, finetune, finetune_lm


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
