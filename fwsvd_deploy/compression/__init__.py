"""Fisher statistics, low-rank math, the factorised layer and the module swap."""

from __future__ import annotations

from .apply import compress, resolve_targets
from .fisher import FisherResult, collect_fisher
from .layers import LowRankLinear
from .report import CompressionReport, LayerReport
from .svd import Decomposition, decompose, relative_error

__all__ = [
    "CompressionReport",
    "Decomposition",
    "FisherResult",
    "LayerReport",
    "LowRankLinear",
    "collect_fisher",
    "compress",
    "decompose",
    "relative_error",
    "resolve_targets",
]
