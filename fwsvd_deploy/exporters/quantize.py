"""Weight quantisation of an optimised graph: ONNX Runtime's dynamic int8, or its weight-only ``MatMulNBits``.

All quantise every MatMul by a constant weight, low-rank factors included (each factor is a MatMul of its own); the
head that writes the graph's logits stays float unless asked. ``int8`` is ONNX Runtime's ``quantize_dynamic``
(int8 weights, activations quantised per call with one scale per tensor: CPU only); ``int4`` and ``int8-weight``
are its ``MatMulNBitsQuantizer`` (4- or 8-bit weights in blocks of ``block_size`` along the input dimension, one
scale, and without ``symmetric`` one zero point, per block and output column; float activations: CPU and CUDA). A
factor's input dimension that is no multiple of the block (a rank of 143) is padded with zeros by the quantiser.
A decoder's activations carry outliers that one int8 scale per tensor cannot hold (SmolLM2-135M's logits keep 4 dB
of signal under dynamic int8, dense or factorised); its weights quantise well block by block, hence
``int8-weight``.

Which factor carries a layer's scale matters to both: see :func:`~.lowrank.resplit_factors`.
"""

from __future__ import annotations

import contextlib
import logging
import unittest.mock
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..config import OptimizeConfig
from ..errors import ConfigError, ExportError, first_line
from .lowrank import _consumers, _initializers, node_attribute

# Operators a quantised graph carries: int8 dynamic (CPU kernels only) and the weight-only MatMul (4 or 8 bits).
INT8_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeLinear",
            "QAttention", "QEmbedLayerNormalization", "QGemm", "DynamicQuantizeLSTM")
NBITS_OPS = ("MatMulNBits",)
QUANTIZED_OPS = INT8_OPS + NBITS_OPS
NBITS = {"int4": 4, "int8-weight": 8}
# The providers with kernels for each; anything else would quietly run those nodes on another provider (8-bit
# MatMulNBits has CUDA kernels since ONNX Runtime 1.22)
RUNS_ON = {"int8": ("cpu",), "int8-weight": ("cpu", "cuda"), "int4": ("cpu", "cuda")}


def nbits(node: onnx.NodeProto) -> int:
    """A ``MatMulNBits`` node's weight bits."""
    return next((a.i for a in node.attribute if a.name == "bits"), 4)


def quantization_of(nodes: Iterable[onnx.NodeProto]) -> str | None:
    """``int8``, ``int8-weight``, ``int4`` or ``None``: what a graph with these nodes was quantised to."""
    found = None
    for node in nodes:
        if node.op_type in NBITS_OPS:
            return "int8-weight" if nbits(node) == 8 else "int4"
        if node.op_type in INT8_OPS:
            found = "int8"
    return found


def graph_nodes(path: str | Path) -> list[onnx.NodeProto]:
    """The nodes of an ONNX file, read without its external weights."""
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def check_runs_on(path: str | Path, device: str) -> None:
    """Refuse a quantised graph on a provider without kernels for its quantised operators.

    Raises:
        ConfigError: e.g. ``MatMulNBits`` on TensorRT, or int8 ``DynamicQuantizeMatMul`` on CUDA.
    """
    scheme = quantization_of(graph_nodes(path))
    if scheme is not None and device not in RUNS_ON[scheme]:
        kernels = "MatMulNBits" if scheme in NBITS else "int8 dynamic quantisation (DynamicQuantizeMatMul)"
        raise ConfigError(
            f"{path} is quantised to {scheme}, and the {device} provider has no {kernels} kernel (ONNX Runtime would "
            f"run those nodes elsewhere and report them as {device}); validate it with --device "
            f"{' or '.join(RUNS_ON[scheme])}, or optimise without --quantize for {device}"
        )


def check_quantizable(model: onnx.ModelProto, cfg: OptimizeConfig, hidden: int) -> None:
    """Refuse what cannot be quantised before any work.

    Raises:
        ConfigError: the graph is quantised already; a MatMulNBits block size that does not divide the hidden size.
    """
    if cfg.quantize is None:
        return
    ops = Counter(n.op_type for n in model.graph.node)
    done = quantization_of(model.graph.node)
    if done is not None:
        found = ", ".join(o for o in QUANTIZED_OPS if ops[o])
        raise ConfigError(f"the graph is quantised already ({done}: {found}); give the float export folder written "
                          "by 'fwsvd-deploy export'")
    if cfg.quantize in NBITS and hidden % cfg.block_size:
        raise ConfigError(f"block_size={cfg.block_size} does not divide the hidden size {hidden}: the blocks of "
                          "every dense layer would be padded; choose a power of two that divides it")


def constant_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes whose second input is a 2-D float initializer: what weight quantisation takes."""
    inits = _initializers(model.graph)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
            and len(n.input) == 2 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


def head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul by a constant whose output is one of the graph's outputs (a causal LM's logits), if there is one;
    its weight an initializer, or the ``Transpose`` of one (an LM head tied to the embeddings)."""
    outputs = {o.name for o in model.graph.output}
    inits = _initializers(model.graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.output[0] in outputs and len(node.input) == 2:
            weight = node.input[1]
            if weight in inits or (weight in producer and producer[weight].op_type == "Transpose"
                                   and producer[weight].input[0] in inits):
                return node
    return None


def _untie(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Give a head that reads ``Transpose(embeddings)`` its own transposed initializer, which quantisers take."""
    inits = _initializers(model.graph)
    if node.input[1] in inits:
        return
    producer = {o: n for n in model.graph.node for o in n.output}
    source = producer[node.input[1]].input[0]
    array = numpy_helper.to_array(inits[source]).T
    name = f"{source}__head"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    node.input[1] = name


def factor_weights(model: onnx.ModelProto) -> set[str]:
    """The initializers of low-rank factors: the weights of constant MatMuls that feed only constant MatMuls or
    Gemms (through a ``Split``, where the restore pass joined the down-projections of q, k and v), and theirs."""
    inits = _initializers(model.graph)
    consumers = _consumers(model.graph)
    outputs = {o.name for o in model.graph.output}

    def readers(name: str) -> list[onnx.NodeProto] | None:
        found = []
        for user in consumers.get(name, []):
            if user.op_type == "Split":
                for out in user.output:
                    more = readers(out)
                    if more is None:
                        return None
                    found += more
            elif user.op_type in ("MatMul", "Gemm") and user.input[0] == name and len(user.input) > 1 \
                    and user.input[1] in inits:
                found.append(user)
            else:
                return None
        return found

    names: set[str] = set()
    for node in constant_matmuls(model):
        if node.output[0] in outputs:
            continue
        ups = readers(node.output[0])
        if ups:
            names |= {node.input[1], *(u.input[1] for u in ups)}
    return names


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the weights matrix products read, by kind: ``float``, ``int8`` (dynamic or weight-only), ``int4``
    (packed) and ``scales`` (the scales and zero points of quantised weights). Embedding tables and norms are left
    out."""
    inits = _initializers(model.graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = Counter({"float": 0, "int8": 0, "int4": 0, "scales": 0})
    seen: set[str] = set()

    def size(name: str) -> int:
        t = inits[name]
        return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            names = [(node.input[1], "int8" if nbits(node) == 8 else "int4"),
                     *((n, "scales") for n in node.input[2:4] if n)]
        elif node.op_type in ("MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            if len(node.input) < 2:
                continue
            name = node.input[1]
            while name not in inits and name in producer and producer[name].op_type in (
                    "Transpose", "Identity", "DequantizeLinear"):
                name = producer[name].input[0]
            kind = "float"
            if name in inits and inits[name].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                kind = "int8"
            names = [(name, kind)]
            if node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"):
                names += [(n, "scales") for n in node.input[2:] if n]
        else:
            continue
        for name, kind in names:
            if name in inits and name not in seen:
                seen.add(name)
                out[kind] += size(name)
    return dict(out)


@dataclass(frozen=True)
class Quantization:
    """What :func:`quantize_graph` did, for the manifest."""

    scheme: str
    bits: int
    block_size: int | None
    symmetric: bool | None
    per_channel: bool | None
    accuracy_level: int | None
    factor_split: str
    quantizer: str | None
    head: str | None
    head_quantized: bool
    matmuls: int
    quantized: int
    kept_float: list[str]
    factors: int
    factors_quantized: int
    weight_bytes: dict[str, int]
    operators: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def quantize_graph(model: onnx.ModelProto, cfg: OptimizeConfig, work: Path) -> tuple[onnx.ModelProto, Quantization]:
    """``model`` quantised as ``cfg`` says; ``work`` is a folder for the int8 quantiser's file.

    Raises:
        ExportError: ONNX Runtime's quantiser failed, or left float a weight it was given.
    """
    model = _copy(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type == "MatMul" and not node.name:  # the quantisers select nodes by name
            node.name = f"matmul_{i}"
    last = head(model)
    if last is not None and cfg.quantize_lm_head:
        _untie(model, last)
    candidates = constant_matmuls(model)
    exclude = [] if cfg.quantize_lm_head or last is None else [last.name]
    wanted = {n.name: n.input[1] for n in candidates if n.name not in exclude}
    matmuls = len({n.name for n in candidates} | set(exclude))
    factors = factor_weights(model)
    # ONNX Runtime's quantisers log through the root logger, and importing the 4-bit one calls logging.basicConfig
    # (a handler, and INFO on the root): imported first, then quietened while they run, the root restored after
    root = logging.getLogger()
    previous, handlers = root.level, list(root.handlers)
    with contextlib.suppress(ImportError):  # said by _nbits, with what to install
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    root.setLevel(logging.ERROR)
    try:
        quantized = _int8(model, cfg, exclude, work) if cfg.quantize == "int8" else _nbits(model, cfg, exclude)
    except ConfigError:
        raise
    except Exception as exc:
        raise ExportError(f"{cfg.quantize} quantisation failed: {first_line(exc)}") from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(previous)
    missed = sorted(set(wanted) & {n.name for n in constant_matmuls(quantized)})
    if missed:
        raise ExportError(f"{cfg.quantize} quantisation left {len(missed)} of {len(wanted)} MatMuls float "
                          f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''})")
    ops = Counter(n.op_type for n in quantized.graph.node)
    blocked = cfg.quantize in NBITS
    return quantized, Quantization(
        scheme=cfg.quantize, bits=NBITS.get(cfg.quantize, 8), block_size=cfg.block_size if blocked else None,
        symmetric=cfg.symmetric if blocked else True, per_channel=None if blocked else cfg.per_channel,
        accuracy_level=cfg.matmul_accuracy_level if blocked else None, factor_split=cfg.factor_split,
        quantizer=cfg.quantizer if blocked else None, head=last.name if last is not None else None,
        head_quantized=last is not None and not exclude,
        matmuls=matmuls, quantized=len(wanted), kept_float=exclude,
        factors=sum(n.input[1] in factors for n in candidates),
        factors_quantized=sum(weight in factors for weight in wanted.values()),
        weight_bytes=weight_bytes(quantized), operators={o: ops[o] for o in QUANTIZED_OPS if ops[o]},
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _int8(model: onnx.ModelProto, cfg: OptimizeConfig, exclude: list[str], work: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "int8.onnx"
    # outputs of contrib operators have no inferred type; they are float32 here
    # MatMuls and the fused operators over them; embedding tables (Gather) stay float, the head tied to them too
    quantize_dynamic(model, str(out), op_types_to_quantize=["MatMul", "Attention", "EmbedLayerNormalization"],
                     weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                     nodes_to_exclude=exclude, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                     use_external_data_format=model.ByteSize() > 2**31 - 1000)
    try:
        return onnx.load(str(out))
    finally:
        for item in work.glob("int8.onnx*"):
            item.unlink()


def _nbits(model: onnx.ModelProto, cfg: OptimizeConfig, exclude: list[str]) -> onnx.ModelProto:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # onnx-ir, which the quantiser imports, is missing
        raise ConfigError(f"{cfg.quantize} quantisation needs ONNX Runtime's MatMulNBits quantiser: "
                          f"{first_line(exc)} (pip install onnx-ir)") from exc
    import onnxruntime as ort

    release = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if cfg.quantize == "int8-weight" and release < (1, 22):
        raise ConfigError(f"int8-weight needs ONNX Runtime 1.22 or newer (8-bit MatMulNBits; this is "
                          f"{ort.__version__}): pip install -U onnxruntime, or use --quantize int4")
    algorithm = None
    if cfg.quantizer == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        if cfg.device == "cpu":
            logging.getLogger("fwsvd_deploy").warning(
                "quantizer hqq: ONNX Runtime's CPU MatMulNBits has no fast kernel for float zero points; measured on "
                "SmolLM2-135M its int4 graph decoded 3.8 times slower than float32 at accuracy level 0 or 4 (round "
                "to nearest: 0.5-0.6 times); use quantizer rtn for a CPU graph that must be fast")

        algorithm = HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=NBITS[cfg.quantize],
                                             op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=NBITS[cfg.quantize], block_size=cfg.block_size,
                                     is_symmetric=cfg.symmetric,
                                     accuracy_level=cfg.matmul_accuracy_level or None, nodes_to_exclude=exclude,
                                     op_types_to_quantize=("MatMul",), algo_config=algorithm)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())  # HQQ's torch.from_numpy of a read-only array
        warnings.simplefilter("ignore", UserWarning)
        if algorithm is not None:  # ONNX Runtime's HQQ moves the weights to a visible GPU and fits them in float16
            # there: on the CPU the same folder gets the same weights on every machine
            import torch

            stack.enter_context(unittest.mock.patch.object(torch.cuda, "is_available", return_value=False))
        quantizer.process()
    quantized = quantizer.model.model
    if algorithm is not None and cfg.matmul_accuracy_level:  # the HQQ quantiser writes no accuracy level
        for node in quantized.graph.node:
            if node.op_type == "MatMulNBits" and node_attribute(node, "accuracy_level") is None:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", cfg.matmul_accuracy_level))
    return quantized
