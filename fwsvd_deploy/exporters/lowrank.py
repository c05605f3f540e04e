"""Low-rank-aware fusion for ONNX Runtime's transformer optimiser.

ONNX Runtime's fusion passes match the graph of a dense model: ``MatMul(x, W) -> Add(b)`` for each of q, k,
v and the attention output. A factorised layer exports as two MatMuls, ``MatMul(MatMul(x, D), U)``, so the
attention pattern no longer matches, and with it the embedding fusion is lost too.

The pass here works around the matcher rather than re-implementing it:

1. :func:`densify` replaces every factorised pair by one MatMul whose weight is the product ``D @ U`` (one Gemm,
   with the same bias, where the up-projection is a Gemm: a Linear on 2-D input) and remembers, by the exact bytes
   of that product, which pair it came from. The graph now has the dense
   structure, so ONNX Runtime's own fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization,
   BiasGelu/FastGelu) apply exactly as they do to the baseline.
2. :func:`restore` puts the factors back: a remaining MatMul whose weight is a known product becomes the two
   MatMuls again; a fused ``Attention`` whose packed q/k/v weight contains known products becomes one
   MatMul with the concatenated down-projections, a Split, the up-projections, and a com.microsoft
   ``MultiHeadAttention`` with the same bias, mask and heads. Every product must be restored, or the pass
   fails: a graph that silently went dense again would be mislabelled.

Products are recognised by value, so the pass needs no knowledge of node names or ONNX Runtime internals
beyond the documented contract of the ``Attention`` and ``MultiHeadAttention`` operators.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from . import weights

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LowRankPair:
    """One factorised layer: ``y = (x @ down) @ up``."""

    down_name: str
    up_name: str
    down: np.ndarray  # (in, r)
    up: np.ndarray  # (r, out)

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])


@dataclass
class LowRankIndex:
    """Dense products by content hash, and how often the restore pass put each back."""

    pairs: dict[str, LowRankPair] = field(default_factory=dict)
    uses: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.pairs)


def _digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def inline_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which ``Identity(initializer)`` nodes are gone and their users read the initializer directly.

    The exporter writes a weight used twice (ALBERT's shared layer) once, and every further use as an Identity of
    it; without this the later uses would not be recognised as factorised pairs.
    """
    model = _copy(model)
    graph = model.graph
    inits = _initializers(graph)
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.output[0] not in outputs:
            source = alias.get(node.input[0], node.input[0])
            if source in inits:
                alias[node.output[0]] = source
    if not alias:
        return model
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] in alias:
            continue
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _const_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2
            and node.input[1] in inits and len(inits[node.input[1]].dims) == 2)


def _const_gemm(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], *, transposed: bool = True) -> bool:
    """``Gemm(x, W, b)`` by a 2-D constant, unscaled: a Linear on 2-D input (OPT's fc1/fc2 run on flattened tokens).

    ``transposed=False`` admits only ``transB=0``, the form :func:`densify` writes.
    """
    return (node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2 and node_attribute(node, "transA", 0) == 0
            and node_attribute(node, "alpha", 1.0) == 1.0 and node_attribute(node, "beta", 1.0) == 1.0
            and (transposed or node_attribute(node, "transB", 0) == 0))


def _up_dims(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, int]:
    """``(rank, out)`` of an up-projection's weight, in MatMul orientation."""
    rows, cols = inits[node.input[1]].dims
    return (cols, rows) if node.op_type == "Gemm" and node_attribute(node, "transB", 0) else (rows, cols)


def _reader(store: weights.WeightStore | None) -> Callable[[onnx.TensorProto], np.ndarray]:
    """How a tensor's value is read: from the store where it is offloaded to one."""
    return numpy_helper.to_array if store is None else store.array


def _up_weight(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
               read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array) -> np.ndarray:
    weight = read(inits[node.input[1]])
    return weight.T if node.op_type == "Gemm" and node_attribute(node, "transB", 0) else weight


def find_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(down_matmul, up)`` node pairs: MatMul by a 2-D constant feeding only MatMuls (or Gemms) by constants.

    One down-projection may feed several up-projections (joint q/k/v, exported as one MatMul); each is a
    pair. The factors must save parameters over the dense weights they stand for, together.
    """
    graph = model.graph
    inits = _initializers(graph)
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    pairs = []
    for node in graph.node:
        if not _const_matmul(node, inits) or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or not all((_const_matmul(u, inits) or _const_gemm(u, inits)) and u.input[0] == node.output[0]
                                for u in users):
            continue
        (n_in, rank), ups = inits[node.input[1]].dims, [_up_dims(u, inits) for u in users]
        n_out = sum(u[1] for u in ups)
        if all(u[0] == rank for u in ups) and rank * (n_in + n_out) < n_in * n_out:
            pairs.extend((node, u) for u in users)
    return pairs


def densify(model: onnx.ModelProto,
            store: weights.WeightStore | None = None) -> tuple[onnx.ModelProto, LowRankIndex]:
    """A copy of ``model`` with each factorised pair replaced by one MatMul on the product of its factors.

    With a ``store``, the factors' values are mapped from it where offloaded (the index holds them so), and each
    product is offloaded to it as soon as it is made (so the dense products are never all in memory at once).
    """
    read = _reader(store)
    model = inline_identities(model)
    graph = model.graph
    inits = _initializers(graph)
    index = LowRankIndex()
    pairs = find_pairs(model)
    drop_nodes: set[int] = set()
    new_nodes: dict[int, onnx.NodeProto] = {}
    used_factors: set[str] = set()
    products: dict[str, str] = {}
    for down_node, up_node in pairs:
        down = read(inits[down_node.input[1]])
        up = _up_weight(up_node, inits, read)
        dense = np.ascontiguousarray((down.astype(np.float64) @ up.astype(np.float64)).astype(down.dtype))
        key = _digest(dense)
        name = f"{up_node.input[1]}__lowrank_product"
        if key in products:  # a shared layer (ALBERT) or identical factors: one product serves all uses
            name = products[key]
        else:
            products[key] = name
            product = numpy_helper.from_array(dense, name)
            del dense
            if store is not None:
                store.add(product)
            graph.initializer.append(product)
            index.pairs[key] = LowRankPair(down_node.input[1], up_node.input[1], down, up)
        # the same operator as the up-projection (a Gemm keeps its bias), on the product in MatMul orientation
        merged = helper.make_node(up_node.op_type, [down_node.input[0], name, *up_node.input[2:]],
                                  list(up_node.output), name=up_node.name)
        if up_node.op_type == "Gemm":
            merged.attribute.extend(a for a in up_node.attribute if a.name != "transB")
        drop_nodes.add(id(down_node))
        new_nodes[id(up_node)] = merged
        used_factors.update([down_node.input[1], up_node.input[1]])
    nodes = [new_nodes.get(id(n), n) for n in graph.node if id(n) not in drop_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name not in used_factors or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model, index


def resplit_factors(model: onnx.ModelProto, split: str) -> tuple[onnx.ModelProto, int]:
    """A copy in which every factorised layer's scale is split between its factors as ``split`` says.

    The compression writes ``down = L^-T V`` (the whitening inverse, columns of unit output variance) and
    ``up = S U^T diag(1/r)`` (the singular values): one factor holds the inverse whitening's range, the other the
    singular values'. Quantisation with one scale per tensor (int8) or per block of input rows (int4) loses the
    small entries of a factor whose range is wide. ``split``:

    * ``exported``: the factors as written;
    * ``balanced``: each rank direction ``j`` scaled by a power of two ``2^k``, ``down[:, j] * 2^k`` and
      ``up[j, :] / 2^k``, with ``k`` the rounded half log2 of the ratio of their largest entries, so both factors
      span the same range: every entry moves only in its exponent, and the product is unchanged bit for bit;
    * ``svd``: the factors rebuilt from the product's own singular value decomposition ``D U = P S Q^T``,
      ``down = P sqrt(S)``, ``up = sqrt(S) Q^T``: both with orthogonal columns scaled alike (the product is the
      same to float rounding).

    A down-projection feeding several up-projections (joint q/k/v) is split once for all of them. Factors another
    layer also reads (ALBERT's shared layer) are left as they are.

    Returns:
        The copy and the number of factorised layers rewritten.
    """
    if split == "exported":
        return model, 0
    model = inline_identities(model)
    graph = model.graph
    inits = _initializers(graph)
    users = Counter(name for n in graph.node for name in n.input)
    groups: dict[str, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}
    for down_node, up_node in find_pairs(model):
        groups.setdefault(down_node.output[0], (down_node, []))[1].append(up_node)
    done = 0
    for down_node, ups in groups.values():
        names = [down_node.input[1], *(u.input[1] for u in ups)]
        if any(users[n] != 1 for n in names) or len(set(names)) != len(names):
            continue
        down = numpy_helper.to_array(inits[names[0]])
        parts = [_up_weight(u, inits) for u in ups]
        up = np.concatenate(parts, axis=1)
        if split == "balanced":
            down, up = _balanced(down, up)
        else:
            down, up = _svd_split(down, up)
        start = 0
        for node, part in zip(ups, parts, strict=True):
            piece = up[:, start:start + part.shape[1]].astype(part.dtype)
            start += part.shape[1]
            transposed = node.op_type == "Gemm" and node_attribute(node, "transB", 0)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(piece.T if transposed else piece), node.input[1]))
        inits[names[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(down), names[0]))
        done += 1
    return model, done


def _balanced(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, u = np.abs(down).max(axis=0), np.abs(up).max(axis=1)
    ok = (d > 0) & (u > 0)
    k = np.zeros(down.shape[1])
    k[ok] = np.round(0.5 * (np.log2(u[ok]) - np.log2(d[ok])))
    return (np.ldexp(down, k.astype(np.int32)[None, :]).astype(down.dtype),
            np.ldexp(up, -k.astype(np.int32)[:, None]).astype(up.dtype))


def _svd_split(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # D U = Qd Rd Ru^T Qu^T with thin QRs; the SVD of the small core gives the product's own singular directions
    qd, rd = np.linalg.qr(down.astype(np.float64))
    qu, ru = np.linalg.qr(up.T.astype(np.float64))
    p, s, qt = np.linalg.svd(rd @ ru.T)
    root = np.sqrt(s)
    return ((qd @ p) * root).astype(down.dtype), (root[:, None] * (qt @ qu.T)).astype(up.dtype)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


class GraphBuilder:
    """Adds initializers and nodes with names unique in the graph."""

    def __init__(self, graph: onnx.GraphProto, store: weights.WeightStore | None = None) -> None:
        self.graph = graph
        self.store = store  # where large initializers go as they are added
        self.names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
        self.names |= {n.name for n in graph.node} | {i.name for i in graph.input}
        self._added: dict[str, str] = {}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def initializer(self, array: np.ndarray, base: str) -> str:
        """Add ``array`` once: an identical array added before (a shared layer) returns that name."""
        key = _digest(array)
        if key in self._added:
            return self._added[key]
        name = self.unique(base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.store is not None and array.nbytes >= weights.OFFLOAD_BYTES:
            self.store.add(tensor)
        self.graph.initializer.append(tensor)
        self._added[key] = name
        return name


def node_attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _split_qkv(weight: np.ndarray, node: onnx.NodeProto) -> list[np.ndarray] | None:
    sizes = node_attribute(node, "qkv_hidden_sizes")
    if sizes is None:
        if weight.shape[1] % 3:
            return None
        sizes = [weight.shape[1] // 3] * 3
    sizes = [int(s) for s in sizes]
    if sum(sizes) != weight.shape[1]:
        return None
    bounds = np.cumsum([0, *sizes])
    return [weight[:, bounds[i]:bounds[i + 1]] for i in range(3)]


def _restore_attention(node: onnx.NodeProto, index: LowRankIndex, inits: dict[str, onnx.TensorProto],
                      build: GraphBuilder, read: Callable[[onnx.TensorProto], np.ndarray] = numpy_helper.to_array
                      ) -> list[onnx.NodeProto] | None:
    """Nodes replacing a fused Attention whose q/k/v weights are known products; None to keep it."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    x, weight_name, bias_name, mask, past, attention_bias = inputs[:6]
    if weight_name not in inits or past or node_attribute(node, "unidirectional", 0) or len(node.output) > 1:
        return None
    slices = _split_qkv(read(inits[weight_name]), node)
    if slices is None:
        return None
    keys = [_digest(s) for s in slices]
    pairs = [index.pairs.get(k) for k in keys]
    if not any(pairs):
        return None
    index.uses.update(k for k in keys if k in index.pairs)
    base = node.name or "attention"
    found = [p for p in pairs if p is not None]
    if len(found) == 3 and len({_digest(p.down) for p in found}) == 1:
        return _joint_attention(node, found, build)
    nodes: list[onnx.NodeProto] = []
    projected: list[str] = [""] * 3
    low = [i for i, p in enumerate(pairs) if p is not None]
    downs = [pairs[i].down for i in low]  # type: ignore[union-attr]
    down_name = build.initializer(np.concatenate(downs, axis=1), f"{base}_lowrank_qkv_down")
    down_out = build.unique(f"{base}_lowrank_qkv_down_out")
    nodes.append(helper.make_node("MatMul", [x, down_name], [down_out], name=build.unique(f"{base}_lowrank_down")))
    if len(low) > 1:
        split_sizes = build.initializer(np.array([d.shape[1] for d in downs], dtype=np.int64), f"{base}_lowrank_split")
        parts = [build.unique(f"{base}_lowrank_r{'qkv'[i]}") for i in low]
        nodes.append(helper.make_node("Split", [down_out, split_sizes], parts, axis=-1,
                                      name=build.unique(f"{base}_lowrank_split")))
    else:
        parts = [down_out]
    for part, i in zip(parts, low, strict=True):
        pair = pairs[i]
        assert pair is not None
        up_name = build.initializer(pair.up, f"{base}_lowrank_{'qkv'[i]}_up")
        projected[i] = build.unique(f"{base}_{'qkv'[i]}")
        nodes.append(helper.make_node("MatMul", [part, up_name], [projected[i]],
                                      name=build.unique(f"{base}_lowrank_{'qkv'[i]}_up")))
    for i, pair in enumerate(pairs):
        if pair is None:  # a dense projection inside an otherwise factorised attention
            w = build.initializer(slices[i], f"{base}_{'qkv'[i]}_weight")
            projected[i] = build.unique(f"{base}_{'qkv'[i]}")
            nodes.append(helper.make_node("MatMul", [x, w], [projected[i]], name=build.unique(f"{base}_{'qkv'[i]}")))
    attrs = {"num_heads": int(node_attribute(node, "num_heads"))}
    for key in ("mask_filter_value", "scale"):
        value = node_attribute(node, key)
        if value is not None:
            attrs[key] = value
    mha_inputs = [*projected, bias_name, mask, attention_bias]
    while mha_inputs and not mha_inputs[-1]:
        mha_inputs.pop()
    nodes.append(helper.make_node("MultiHeadAttention", mha_inputs, list(node.output), domain=MS_DOMAIN,
                                  name=build.unique(f"{base}_mha"), **attrs))
    return nodes


def _joint_attention(node: onnx.NodeProto, pairs: list[LowRankPair], build: GraphBuilder) -> list[onnx.NodeProto]:
    """``Attention(x @ D, [Uq | Uk | Uv])``: the fused operator itself, on the shared down-projection's output."""
    base = node.name or "attention"
    down = build.initializer(pairs[0].down, f"{base}_lowrank_qkv_down")
    up = build.initializer(np.concatenate([p.up for p in pairs], axis=1), f"{base}_lowrank_qkv_up")
    reduced = build.unique(f"{base}_lowrank_qkv_down_out")
    attention = helper.make_node("Attention", [reduced, up, *node.input[2:]], list(node.output), domain=MS_DOMAIN,
                                 name=build.unique(f"{base}_lowrank"))
    attention.attribute.extend(node.attribute)
    return [helper.make_node("MatMul", [node.input[0], down], [reduced], name=build.unique(f"{base}_lowrank_down")),
            attention]


def restore(model: onnx.ModelProto, index: LowRankIndex,
            store: weights.WeightStore | None = None) -> onnx.ModelProto:
    """Put the factorised layers back into an optimised graph built from :func:`densify`'s output.

    ``store``: where the graph's offloaded weights are; the factors put back are offloaded to it too.

    Raises:
        ExportError: when a dense product is left in the graph (the fusion changed it beyond recognition).
    """
    model = _copy(model)
    graph = model.graph
    inits = _initializers(graph)
    build = GraphBuilder(graph, store)
    read = _reader(store)
    out_nodes: list[onnx.NodeProto] = []
    reduced: dict[tuple[str, str], str] = {}  # (input, down-projection) -> its output, computed once
    for node in graph.node:
        if node.op_type == "Attention" and node.domain == MS_DOMAIN:
            replacement = _restore_attention(node, index, inits, build, read)
            if replacement is not None:
                out_nodes.extend(replacement)
                continue
        if _const_matmul(node, inits) or _const_gemm(node, inits, transposed=False):
            key = _digest(read(inits[node.input[1]]))
            pair = index.pairs.get(key)
            if pair is not None:
                index.uses[key] += 1
                down = build.initializer(pair.down, pair.down_name)
                up = build.initializer(pair.up, pair.up_name)
                mid = reduced.get((node.input[0], down))
                if mid is None:
                    mid = reduced[(node.input[0], down)] = build.unique(f"{node.name or 'matmul'}_lowrank")
                    out_nodes.append(helper.make_node("MatMul", [node.input[0], down], [mid],
                                                      name=build.unique(f"{node.name}_down")))
                up_node = helper.make_node(node.op_type, [mid, up, *node.input[2:]], list(node.output),
                                           name=build.unique(f"{node.name}_up"))
                up_node.attribute.extend(node.attribute)  # a Gemm's transA/alpha/beta (transB is 0)
                out_nodes.append(up_node)
                continue
        out_nodes.append(node)
    del graph.node[:]
    graph.node.extend(out_nodes)
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    leftover = [i.name for i in graph.initializer if _digest(read(i)) in index.pairs]
    if leftover:
        raise ExportError(f"{len(leftover)} factorised layers stayed dense after fusion (e.g. {leftover[0]})")
    restored = {k for k, v in index.uses.items() if v}
    if len(restored) != len(index):
        raise ExportError(f"restored {len(restored)} of {len(index)} factorised layers after fusion")
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model
