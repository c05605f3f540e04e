"""Calibration statistics, low-rank math, the factorised layer and the module swap."""

from __future__ import annotations

from .apply import compress
from .fisher import collect_fisher
from .layers import LowRankLinear
from .report import CompressionReport, LayerReport
from .statistics import CalibrationStats, FisherResult, collect_statistics
from .svd import Decomposition, decompose, relative_error
from .targets import resolve_targets

__all__ = [
    "CalibrationStats",
    "CompressionReport",
    "Decomposition",
    "FisherResult",
    "LayerReport",
    "LowRankLinear",
    "collect_fisher",
    "collect_statistics",
    "compress",
    "decompose",
    "relative_error",
    "resolve_targets",
]
