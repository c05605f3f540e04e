"""Decoder attention fusion: an exported rotary attention block becomes one com.microsoft ``GroupQueryAttention``.

optimum-onnx exports a Llama-style attention (Llama, Mistral, Qwen2) as PyTorch's scaled-dot-product attention,
traced: per layer about 90 nodes of shape arithmetic, reshapes, transposes, the key/value heads repeated for
grouped-query attention, two MatMuls, the mask and a Softmax. ONNX Runtime's own decoder matcher
(``FusionRotaryAttention``) wants another arrangement and fuses none of it, so every decode step runs 2,300 small
operators on SmolLM2; their cost is fixed per step and weighs against what a smaller model saves on its MatMuls.

This pass matches the block from the tensors it must have, not from node names::

    q3 = q_proj(x)   k3 = k_proj(x)   v3 = v_proj(x)                              [batch, seq, heads * head_dim]
    q  = RotaryEmbedding(Transpose(Reshape(q3)))                                   [batch, heads, seq, head_dim]
    k  = Concat(past_key, RotaryEmbedding(Transpose(Reshape(k3))))  = present.N.key   (Concat absent without a cache)
    v  = Concat(past_value, Transpose(Reshape(v3)))                 = present.N.value
    scores = MatMul(q * s1, Transpose(repeat(k)) * s2) + mask                     (repeat: Unsqueeze/Expand/Reshape)
    out3 = Reshape(Transpose(MatMul(Softmax(scores) [IsNaN -> 0], repeat(v))))    [batch, seq, heads * head_dim]

and writes, for each block::

    out3, present.N.key, present.N.value = GroupQueryAttention(
        RotaryEmbedding(q3), RotaryEmbedding(k3), v3, past_key, past_value, seqlens_k, total_length, bias,
        scale=s1 * s2, do_rotary=0)

The rotary embeddings stay separate operators (on the 3-D projections, so their count is unchanged) and keep their
``position_ids`` input, so positions are exactly the model's: counted from the first real token of a left-padded
row. The operator masks causally itself; padding goes in as an additive bias built once per graph from the
``attention_mask`` input (``[batch, 1, seq, total]``, the float32 minimum on padded keys), with ``seqlens_k`` the
full length for every row. A fully padded query row (a left pad) then averages the padded keys instead of becoming
NaN, as it does in the exported graph; neither is ever read. Everything the old blocks used alone (and the
model's own mask construction) goes.

Limits, both ONNX Runtime's: the operator takes several new tokens at once on top of a cache only at batch 1
(prefill with an empty cache and one-token decode steps take any batch, which is what generation does), and the
additive bias is implemented on the CPU only.

For CUDA (``padding="lengths"``: float16 graphs, the operator's CUDA kernel takes no float32) the block is fused
without the bias, as onnxruntime-genai's graphs are: ``seqlens_k`` is each row's count of real tokens minus one
(``ReduceSum`` of ``attention_mask``), ``total_length`` the mask's width. Rows must then be unpadded or padded on
the right (what generation feeds), and the graph can run on one preallocated max-length cache that past and present
share (the same buffer bound to both): the mask may be as wide as the buffer, zeros after each row's tokens, so that
every decode step has the same shapes, which a captured CUDA graph needs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError
from .lowrank import MS_DOMAIN, GraphBuilder, node_attribute

_ONNX_DOMAINS = ("", "ai.onnx")
_REPEAT_OPS = ("Reshape", "Expand", "Unsqueeze")  # repeat_kv: Unsqueeze -> Expand -> Reshape
PADDING = ("bias", "lengths")  # how the fused operator learns each row's tokens: additive bias, or seqlens_k
_HEADS_FIRST = [0, 2, 1, 3]  # [batch, seq, heads, dim] <-> [batch, heads, seq, dim]


@dataclass(frozen=True)
class AttentionFusion:
    """What :func:`fuse_decoder_attention` did.

    Attributes:
        fused: attention blocks now one ``GroupQueryAttention``.
        blocks: attention blocks found (Softmax nodes of the graph).
        note: why nothing was fused, when that is so.
        padding: how the fused operators mask padding (:data:`PADDING`); ``None`` when none was fused.
    """

    fused: int
    blocks: int
    note: str | None = None
    padding: str | None = None

    @property
    def shares_cache(self) -> bool:
        """Whether the graph can run on one max-length cache buffer shared by past and present, fed a mask as wide
        as the buffer: every block fused, each row's length given by ``seqlens_k``."""
        return self.padding == "lengths" and self.fused == self.blocks > 0

    def to_dict(self) -> dict[str, object]:
        return {"fused": self.fused, "blocks": self.blocks, "note": self.note, "padding": self.padding,
                "shares_cache": self.shares_cache}


@dataclass(frozen=True)
class _Block:
    q3: str
    k3: str
    v3: str
    past_key: str
    past_value: str
    present_key: str | None
    present_value: str | None
    out3: str
    scale: float
    rotary: onnx.NodeProto  # the query's RotaryEmbedding: position_ids, cos/sin caches and attributes to reuse
    replaced: tuple[onnx.NodeProto, ...]  # nodes whose outputs the new ones produce


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.float_inputs = {i.name for i in graph.input
                             if i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        self.outputs = {o.name for o in graph.output}

    def node(self, tensor: str, op: str, domain: Iterable[str] = _ONNX_DOMAINS) -> onnx.NodeProto | None:
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op and n.domain in tuple(domain) else None

    def only_user(self, tensor: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs:
            return None
        return users[0] if users[0].op_type == op and users[0].domain in _ONNX_DOMAINS else None

    def scalar(self, tensor: str) -> float | None:
        if tensor in self.inits:
            value = numpy_helper.to_array(self.inits[tensor])
        else:
            n = self.node(tensor, "Constant")
            if n is None or not n.attribute or n.attribute[0].name != "value":
                return None
            value = numpy_helper.to_array(n.attribute[0].t)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def unscale(self, tensor: str) -> tuple[str, float]:
        """``(x, s)`` for ``tensor = x * s`` (or ``x / (1/s)``) by a constant scalar; ``(tensor, 1)`` otherwise."""
        n = self.producer.get(tensor)
        if n is not None and n.op_type in ("Mul", "Div") and n.domain in _ONNX_DOMAINS:
            for i in (1, 0) if n.op_type == "Mul" else (1,):
                s = self.scalar(n.input[i])
                if s is not None and s != 0:
                    return n.input[1 - i], (s if n.op_type == "Mul" else 1.0 / s)
        return tensor, 1.0

    def heads_first(self, tensor: str) -> str | None:
        """``x3`` for ``tensor = Transpose(Reshape(x3), perm=[0, 2, 1, 3])``."""
        t = self.node(tensor, "Transpose")
        if t is None or _perm(t) != _HEADS_FIRST:
            return None
        r = self.node(t.input[0], "Reshape")
        return r.input[0] if r is not None else None

    def unrepeat(self, tensor: str) -> str:
        """The tensor under a chain of ``Reshape``/``Expand``/``Unsqueeze`` (repeated key/value heads)."""
        seen = 0
        while seen < 8:
            n = self.producer.get(tensor)
            if n is None or n.op_type not in _REPEAT_OPS or n.domain not in _ONNX_DOMAINS:
                return tensor
            tensor, seen = n.input[0], seen + 1
        return tensor

    def derives_from(self, tensor: str, source: str, limit: int = 400) -> bool:
        """Whether ``tensor`` is computed from the graph input ``source`` and from no other float input's values
        (shapes may come from anywhere: the model's mask takes the past length from the cache's shape)."""
        stack, seen, found = [tensor], set(), False
        while stack and len(seen) < limit:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            found |= name == source
            if name in self.float_inputs:
                return False
            n = self.producer.get(name)
            if n is not None and n.op_type != "Shape":
                stack.extend(i for i in n.input if i)
        return found and not stack

    def cached(self, tensor: str) -> tuple[str, str, onnx.NodeProto | None]:
        """``(past, new, concat)`` for ``tensor = Concat(past, new, axis=-2)`` of a graph input; else ``("", tensor,
        None)``."""
        c = self.node(tensor, "Concat")
        if (c is not None and len(c.input) == 2 and c.input[0] in self.inputs
                and node_attribute(c, "axis") in (-2, 2)):
            return c.input[0], c.input[1], c
        return "", tensor, None


def _perm(node: onnx.NodeProto) -> list[int]:
    return [int(p) for p in node_attribute(node, "perm", [])]  # type: ignore[union-attr]


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Block | None:
    """The attention block around one Softmax, or ``None`` when it is not the exported rotary attention."""
    if node_attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    add = g.node(softmax.input[0], "Add")
    if add is None:
        return None
    qk = next((m for m in (g.node(i, "MatMul") for i in add.input) if m is not None), None)
    if qk is None or any(i in g.inits for i in qk.input):
        return None
    # the scores get the mask and nothing else (a position bias would be lost): Where(keep, 0, -inf or the minimum)
    mask = g.node(next((i for i in add.input if i != qk.output[0]), ""), "Where")
    if (mask is None or g.scalar(mask.input[1]) != 0.0 or not (g.scalar(mask.input[2]) or 0.0) <= -1e30
            or not g.derives_from(mask.input[0], "attention_mask")):
        return None
    q_rot, s_q = g.unscale(qk.input[0])
    k_t, s_k = g.unscale(qk.input[1])
    transpose = g.node(k_t, "Transpose")
    if transpose is None or _perm(transpose) != [0, 1, 3, 2]:
        return None
    k_rep, s_k2 = g.unscale(transpose.input[0])
    past_key, k_rot, key_concat = g.cached(g.unrepeat(k_rep))
    rq, rk = g.node(q_rot, "RotaryEmbedding", (MS_DOMAIN,)), g.node(k_rot, "RotaryEmbedding", (MS_DOMAIN,))
    if rq is None or rk is None or list(rq.input[1:]) != list(rk.input[1:]) or rq.attribute != rk.attribute:
        return None
    q3, k3 = g.heads_first(rq.input[0]), g.heads_first(rk.input[0])
    # probabilities: Softmax, or Where(IsNaN(Softmax), 0, Softmax) (fully masked rows zeroed)
    probs = softmax.output[0]
    users = g.consumers.get(probs, [])
    if {u.op_type for u in users} == {"IsNaN", "Where"} and len(users) == 2:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        if where.input[0] != isnan.output[0] or where.input[2] != probs or g.scalar(where.input[1]) != 0.0:
            return None
        probs = where.output[0]
    av = g.only_user(probs, "MatMul")
    if av is None or av.input[0] != probs:
        return None
    past_value, v_heads, value_concat = g.cached(g.unrepeat(av.input[1]))
    v3 = g.heads_first(v_heads)
    back = g.only_user(av.output[0], "Transpose")
    out = g.only_user(back.output[0], "Reshape") if back is not None and _perm(back) == _HEADS_FIRST else None
    if q3 is None or k3 is None or v3 is None or out is None or bool(past_key) != bool(past_value):
        return None
    return _Block(q3, k3, v3, past_key, past_value, key_concat.output[0] if key_concat else None,
                  value_concat.output[0] if value_concat else None, out.output[0], s_q * s_k * s_k2, rq,
                  tuple(n for n in (key_concat, value_concat, out) if n is not None))


def attention_blocks(model: onnx.ModelProto) -> int:
    """Attention blocks in an exported decoder graph: its Softmax nodes."""
    return sum(1 for n in model.graph.node if n.op_type == "Softmax" and n.domain in _ONNX_DOMAINS)


def attention_padding(device: str) -> str:
    """How the fused operator of a ``device`` graph masks padding (:data:`PADDING`): a bias on the CPU, lengths
    on CUDA."""
    return "bias" if device == "cpu" else "lengths"


def attention_blocker(config: object, device: str, enabled: bool = True, fp16: bool = False) -> str | None:
    """Why a decoder of ``config`` optimised for ``device`` keeps its exported attention; ``None`` when it need not."""
    if not enabled:
        return "fuse_attention is off"
    if device == "cuda" and not fp16:
        return ("GroupQueryAttention's CUDA kernel takes float16 only; the float32 CUDA graph keeps the exported "
                "attention (optimise with --fp16 to fuse it)")
    if device not in ("cpu", "cuda"):
        return f"attention is fused for the CPU and CUDA only; the {device} graph keeps the exported attention"
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    if window is not None and (positions is None or int(window) < int(positions)):
        return f"sliding-window attention (window {window}) is left as exported"
    return None


@functools.cache
def runtime_supports_fusion() -> bool:
    """Whether this ONNX Runtime's CPU ``GroupQueryAttention`` takes an additive attention bias (input 10) and
    applies it (a bias that hides a key the causal mask would show)."""
    import onnxruntime as ort

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, 2, 8]), helper.make_tensor_value_info("k", f, [1, 2, 8]),
              helper.make_tensor_value_info("v", f, [1, 2, 8]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("bias", f, [1, 1, 2, 2])]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total", "", "", "", "bias"],
                            ["o", "pk", "pv"], domain=MS_DOMAIN, num_heads=1, kv_num_heads=1)
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "pk", "pv")]
    model = helper.make_model(helper.make_graph([node], "probe", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.arange(16, dtype=np.float32).reshape(1, 2, 8) / 16
        bias = np.array([[[[0, 0], [-1e30, 0]]]], dtype=np.float32)  # the second token may not see the first
        out = session.run(None, {"q": x, "k": x, "v": x, "seqlens_k": np.array([1], np.int32),
                                 "total": np.array(2, np.int32), "bias": bias})[0]
        return bool(np.allclose(out[0, 1], x[0, 1], atol=1e-5))  # it saw only itself: the bias was applied
    except Exception:  # noqa: BLE001 - any failure means the operator cannot serve here
        return False


def _shared_inputs(build: GraphBuilder, padding: str = "bias") -> tuple[list[onnx.NodeProto], str, str, str]:
    """Nodes computing ``seqlens_k`` (int32 ``[batch]``), ``total_length`` (int32 scalar) and the padding bias
    (float32 ``[batch, 1, seq, total]``) from ``input_ids`` and ``attention_mask``; and those three names (the bias
    ``""`` with ``padding="lengths"``, where ``seqlens_k`` counts each row's real tokens instead)."""
    const = build.initializer
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, inputs: list[str], base: str, **attrs: object) -> str:
        out = build.unique(f"/attention_inputs/{base}")
        nodes.append(helper.make_node(kind, inputs, [out], name=build.unique(f"/attention_inputs/{kind}"), **attrs))
        return out

    one, zero = const(np.array([1], np.int64), "attention_one"), const(np.array([0], np.int64), "attention_zero")
    two = const(np.array([2], np.int64), "attention_two")
    mask_shape = op("Shape", ["attention_mask"], "mask_shape")
    total = op("Cast", [op("Gather", [mask_shape, one], "total_1d", axis=0)], "total_1d_int32", to=TensorProto.INT32)
    total_scalar = op("Squeeze", [total, zero], "total_length")
    one_int32 = const(np.array([1], np.int32), "attention_one_int32")
    if padding == "lengths":
        tokens = op("Cast", [op("ReduceSum", ["attention_mask", one], "tokens", keepdims=0)], "tokens_int32",
                    to=TensorProto.INT32)
        return nodes, op("Sub", [tokens, one_int32], "seqlens_k"), total_scalar, ""
    last = op("Sub", [total, one_int32], "last_index")
    seqlens = op("Expand", [last, op("Slice", [mask_shape, zero, one], "batch")], "seqlens_k")
    padded = op("Equal", ["attention_mask", const(np.array(0, np.int64), "attention_zero_scalar")], "padded")
    minimum = const(np.array(np.finfo(np.float32).min, np.float32), "attention_mask_min")
    bias = op("Where", [padded, minimum, const(np.array(0, np.float32), "attention_mask_zero")], "bias_2d")
    bias = op("Unsqueeze", [bias, const(np.array([1, 2], np.int64), "attention_bias_axes")], "bias_4d")
    seq = op("Slice", [op("Shape", ["input_ids"], "ids_shape"), one, two], "seq")
    shape = op("Concat", [const(np.array([1, 1], np.int64), "attention_ones"), seq, one], "bias_shape", axis=0)
    bias = op("Expand", [bias, shape], "attention_bias")
    return nodes, seqlens, total_scalar, bias


def fuse_decoder_attention(model: onnx.ModelProto, *, num_heads: int, num_kv_heads: int,
                           padding: str = "bias") -> tuple[onnx.ModelProto, AttentionFusion]:
    """A copy of a topologically sorted decoder graph with every exported rotary attention block fused.

    ``padding`` is how the operator learns which keys are real: ``"bias"`` (any padding; the CPU), or
    ``"lengths"`` (unpadded or right-padded rows; CUDA, and a shared max-length cache).
    A graph in which no block matches comes back as it was, with the reason in the result's ``note``.
    """
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {PADDING}, not {padding!r}")
    graph_inputs = {i.name for i in model.graph.input}
    blocks_seen = attention_blocks(model)
    if not {"input_ids", "attention_mask"} <= graph_inputs:
        return model, AttentionFusion(0, blocks_seen, "the graph has no input_ids / attention_mask inputs")
    mask_type = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == "attention_mask")
    if mask_type != TensorProto.INT64:
        return model, AttentionFusion(0, blocks_seen, f"attention_mask is {TensorProto.DataType.Name(mask_type)}, "
                                                      "not INT64 as optimum exports it")
    if padding == "bias" and not runtime_supports_fusion():
        return model, AttentionFusion(0, blocks_seen, "this ONNX Runtime's GroupQueryAttention takes no attention "
                                                      "bias on the CPU; attention left as exported")
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    g = _Graph(copied.graph)
    blocks = [b for b in (_match(g, n) for n in copied.graph.node
                          if n.op_type == "Softmax" and n.domain in _ONNX_DOMAINS) if b is not None]
    if not blocks:
        return model, AttentionFusion(0, blocks_seen, "no attention block of the exported rotary form was found")
    build = GraphBuilder(copied.graph)
    name = build.unique
    shared, seqlens, total, bias = _shared_inputs(build, padding)
    replaced = {id(n) for b in blocks for n in b.replaced}
    # each block's new nodes go where its output was produced; the shared inputs (of graph inputs only) first
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for i, block in enumerate(blocks):
        rotary_attrs = {a.name: helper.get_attribute_value(a) for a in block.rotary.attribute}
        nodes = []
        rotated = []
        for tensor, heads, what in ((block.q3, num_heads, "q"), (block.k3, num_kv_heads, "k")):
            out = name(f"{tensor}_rotary")
            nodes.append(helper.make_node("RotaryEmbedding", [tensor, *block.rotary.input[1:]], [out],
                                          name=name(f"RotaryEmbedding_{what}_{i}"), domain=MS_DOMAIN,
                                          **{**rotary_attrs, "num_heads": heads}))
            rotated.append(out)
        outputs = [block.out3, block.present_key or name(f"present_key_{i}"),
                   block.present_value or name(f"present_value_{i}")]
        inputs = [*rotated, block.v3, block.past_key, block.past_value, seqlens, total, "", "", "", bias]
        while not inputs[-1]:  # no bias: the optional inputs after total_length are left off
            inputs.pop()
        nodes.append(helper.make_node(
            "GroupQueryAttention", inputs, outputs,
            name=name(f"GroupQueryAttention_{i}"), domain=MS_DOMAIN, num_heads=num_heads, kv_num_heads=num_kv_heads,
            scale=float(block.scale), do_rotary=0, local_window_size=-1))
        out_node = block.replaced[-1]
        new_nodes[id(out_node)] = nodes
    ordered: list[onnx.NodeProto] = list(shared)
    for node in copied.graph.node:
        if id(node) in new_nodes:
            ordered.extend(new_nodes[id(node)])
        if id(node) not in replaced:
            ordered.append(node)
    del copied.graph.node[:]
    copied.graph.node.extend(ordered)
    _tidy(copied)
    if not any(o.domain == MS_DOMAIN for o in copied.opset_import):
        copied.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return copied, AttentionFusion(len(blocks), blocks_seen, padding=padding)


def _tidy(model: onnx.ModelProto) -> None:
    """Topological order, then the old blocks (and whatever only they used) dropped: ONNX Runtime's own passes."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    logger = logging.getLogger("onnxruntime.transformers")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        wrapper = OnnxModel(model)
        wrapper.topological_sort()
        wrapper.prune_graph(allow_remove_graph_inputs=False)
    except RuntimeError as exc:  # the sort found a node whose inputs nothing produces
        raise ExportError(f"the attention fusion left a broken graph ({exc}); report it, and optimise with "
                          "--no-fuse-attention (optimize.fuse_attention: false) meanwhile") from exc
    finally:
        logger.setLevel(previous)
