"""ONNX export and ONNX Runtime optimisation (low-rank aware), for encoders and decoder language models."""

from __future__ import annotations

from .decoder import DECODER_TASKS, CacheLayout
from .onnx import ExportResult, export_onnx
from .optimize import OptimizeResult, fusion_counts, optimize_onnx

__all__ = ["DECODER_TASKS", "CacheLayout", "ExportResult", "OptimizeResult", "export_onnx", "fusion_counts",
           "optimize_onnx"]
