"""fwsvd-deploy: Fisher-weighted SVD compression of transformers models, ONNX export and validation."""

from __future__ import annotations

from .checkpoint import load_compressed, save_compressed, save_model
from .compression import (
    CompressionReport,
    FisherResult,
    LayerReport,
    LowRankLinear,
    collect_fisher,
    compress,
    resolve_targets,
)
from .config import CompressionConfig, DataConfig, FinetuneConfig, FisherConfig
from .data import TaskData, TaskSplits, load_splits
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
from .modeling import load_classifier, load_tokenizer
from .training import EvalResult, FinetuneResult, evaluate, finetune

__version__ = "0.1.0"

__all__ = [
    "AlreadyCompressedError",
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
    "TaskData",
    "TaskSplits",
    "UnsupportedModuleError",
    "collect_fisher",
    "compress",
    "evaluate",
    "finetune",
    "load_classifier",
    "load_compressed",
    "load_splits",
    "load_tokenizer",
    "resolve_targets",
    "save_compressed",
    "save_model",
]
