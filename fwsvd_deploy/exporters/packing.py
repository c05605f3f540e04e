"""One MatMul for the projections that read one tensor.

A transformer block multiplies one tensor by several weights: q, k and v read the attention's normalised input,
the MLP's gate and up its own; once factorised, their down-projections do. Each is a MatMul of its own in the
exported graph, and a decode step, which multiplies one row per sequence, pays each operator's fixed cost and
streams each thin weight on its own (onnxruntime-genai's model builder writes q/k/v as one MatMul for the same
reason). :func:`pack_shared_inputs` joins them: one MatMul by the weights concatenated along the output axis, then
a ``Split`` into the tensors the members produced, so every consumer is left as it was. Each output column is the
same dot product as before, so the graph computes the same values.

Only plain ``MatMul`` nodes by a 2-D float initializer that no other node reads are joined (a weight shared with
another node, an LM head tied to the embeddings, stays where it is), members of one group in graph order. With
``which="factors"`` only low-rank down-projections are (the thin products: MLAS runs a product below its threading
threshold on one thread, and joined they are wide enough to be split across threads). On the CPU neither mode
changed a decode step measurably (``benchmarks/results/decode_packing.md``); the pass is for devices that pay each
operator's launch (CUDA), where it is not measured yet.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .lowrank import GraphBuilder, _consumers, _copy, _initializers, find_pairs

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def shared_input_groups(model: onnx.ModelProto, which: str = "all") -> list[list[onnx.NodeProto]]:
    """The groups of two or more constant MatMuls that read one tensor and could be joined, in graph order;
    ``which="factors"``: only low-rank down-projections (what the up-projections read)."""
    graph = model.graph
    inits = _initializers(graph)
    readers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}  # a weight that is also a graph input can be fed: it must stay
    downs = {down.output[0] for down, _ in find_pairs(model)} if which == "factors" else set()
    groups: dict[tuple[str, int, int], list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type not in _FLOATS or node.input[1] in inputs:
            continue
        if len(readers.get(node.input[1], [])) != 1 or node.output[0] in outputs:
            continue  # a weight another node reads too, or a graph output (its name must stay a MatMul's)
        if which == "factors" and node.output[0] not in downs:
            continue
        groups[(node.input[0], int(weight.dims[0]), weight.data_type)].append(node)
    return [members for members in groups.values() if len(members) > 1]


def pack_shared_inputs(model: onnx.ModelProto, which: str = "all") -> tuple[onnx.ModelProto, int]:
    """``model`` with each group of :func:`shared_input_groups` joined, and the number of MatMuls that went away.

    The joined MatMul takes the first member's place in the graph (its input exists there already) and the
    ``Split`` follows it, giving each member's output its old name.
    """
    groups = shared_input_groups(model, which)
    if not groups:
        return model, 0
    model = _copy(model)
    graph = model.graph
    inits = _initializers(graph)
    build = GraphBuilder(graph)
    split_input = _opset(model) >= 13
    members = {n.output[0] for g in groups for n in g}
    by_first = {g[0].output[0]: g for g in groups}
    dropped: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.output[0] in members:
            group = by_first.get(node.output[0])
            if group is None:
                continue  # a later member: its column block is computed by the group's first node
            weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
            dropped |= {n.input[1] for n in group}
            base = group[0].name or "matmul"
            packed = build.unique(f"{base}_packed_weight")  # its own, even where two groups' bytes are the same
            graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), packed))
            out = build.unique(f"{base}_packed")
            nodes.append(helper.make_node("MatMul", [node.input[0], packed], [out],
                                          name=build.unique(f"{base}_packed")))
            sizes = [int(w.shape[1]) for w in weights]
            names = [n.output[0] for n in group]
            if split_input:
                split = build.initializer(np.array(sizes, dtype=np.int64), f"{base}_packed_split")
                nodes.append(helper.make_node("Split", [out, split], names, axis=-1,
                                              name=build.unique(f"{base}_packed_split")))
            else:
                nodes.append(helper.make_node("Split", [out], names, axis=-1, split=sizes,
                                              name=build.unique(f"{base}_packed_split")))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model, sum(len(g) - 1 for g in groups)
