"""ONNX export and ONNX Runtime optimisation (low-rank aware)."""

from __future__ import annotations

from .onnx import ExportResult, export_onnx
from .optimize import OptimizeResult, fusion_counts, optimize_onnx

__all__ = ["ExportResult", "OptimizeResult", "export_onnx", "fusion_counts", "optimize_onnx"]
