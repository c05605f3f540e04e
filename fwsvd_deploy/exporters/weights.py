"""Large weights kept in a file while graph passes rewrite a model, so that each copy of the graph a pass makes is
small.

ONNX Runtime's fusion passes and the low-rank passes copy the whole ``ModelProto`` several times; with the weights
inside it a 0.5 B-parameter decoder peaked at about 7 times its float32 size. :class:`WeightStore` moves every large
initializer's bytes into one file and leaves the tensor in the graph as an external-data reference to it (its name,
type and shape unchanged), so the passes rewrite nodes over a graph of a few megabytes. Code that needs a value
maps it from the file with :meth:`WeightStore.array`. :meth:`WeightStore.save` streams the tensors into the output's
own data file, one at a time.

Only passes that never read a large weight may run on an offloaded graph: ONNX Runtime's normalisation and rotary
fusions on a decoder do not; its encoder attention fusion (which concatenates q/k/v weights) does, so encoders are
optimised with their weights in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

OFFLOAD_BYTES = 1 << 20  # initializers at least this large are offloaded
STORE_FILE = "offloaded.bin"
INLINE_LIMIT = 2**31 - 2**24  # a model whose weights and graph together exceed this is saved with external data
_WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Gather": 0, "Transpose": 0}  # the input of each operator that is offloaded
# (a tied embedding table is read by a Gather and, as the output projection, through a Transpose)


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The tensors of ``graph``'s node attributes (a Constant's value), its subgraphs' included."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _attribute_tensors(attribute.g)
                yield from attribute.g.initializer
            for subgraph in attribute.graphs:
                yield from _attribute_tensors(subgraph)
                yield from subgraph.initializer


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` (its bytes written out) a reference to ``length`` bytes at ``offset`` of ``location``."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _read(tensor: onnx.TensorProto, base_dir: Path | None) -> bytes:
    """The bytes an external ``tensor`` refers to, its location relative to ``base_dir``."""
    if base_dir is None:
        raise ValueError(f"{tensor.name} is external data; give the folder its location is relative to")
    info = _external(tensor)
    with (base_dir / info["location"]).open("rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def _set_inline(tensor: onnx.TensorProto, data: bytes) -> None:
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


class WeightStore:
    """The offloaded weights of one model, in ``directory``/``offloaded.bin`` (the directory is the caller's)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / STORE_FILE
        self.path.touch()
        self._size = self.path.stat().st_size

    def offloaded(self, tensor: onnx.TensorProto) -> bool:
        return uses_external_data(tensor) and _external(tensor).get("location") == STORE_FILE

    def add(self, tensor: onnx.TensorProto, source_dir: Path | None = None) -> None:
        """Move ``tensor``'s bytes into the store: inline ones, or external ones of a model in ``source_dir``
        (copied file to file: the bytes of a message once set stay in protobuf's memory until it is freed)."""
        if self.offloaded(tensor):
            return
        data = _read(tensor, source_dir) if uses_external_data(tensor) else tensor.raw_data
        with self.path.open("ab") as f:
            f.write(data)
        offset, self._size = self._size, self._size + len(data)
        _point(tensor, STORE_FILE, offset, len(data))

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """``tensor``'s value: an offloaded one mapped read-only from the store's file, not read into memory."""
        if not self.offloaded(tensor):
            return numpy_helper.to_array(tensor)
        info = _external(tensor)
        return np.memmap(self.path, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type), mode="r",
                         offset=int(info["offset"]), shape=tuple(tensor.dims))

    def offload(self, model: onnx.ModelProto, source_dir: Path | None = None, threshold: int | None = None) -> int:
        """Offload every matrix-product weight and embedding table of at least ``threshold`` bytes
        (:data:`OFFLOAD_BYTES`); returns how many.

        Only those: ONNX Runtime's shape inference reads the other initializers a fusion pass looks at (norm
        weights, biases, shapes), and fails on an offloaded one, which silently costs the fusion. Every other
        external tensor of a model loaded without its data (``load_external_data=False``) is read back into the
        graph from ``source_dir``; the offloaded ones are read from there too, one at a time.
        """
        threshold = OFFLOAD_BYTES if threshold is None else threshold
        readers: dict[str, list[tuple[str, int]]] = {}
        for node in model.graph.node:
            for slot, name in enumerate(node.input):
                readers.setdefault(name, []).append((node.op_type, slot))
        moved = 0
        for tensor in model.graph.initializer:
            if self.offloaded(tensor):
                continue
            external = uses_external_data(tensor)
            size = int(_external(tensor).get("length") or 0) if external else len(tensor.raw_data)
            weight = bool(readers.get(tensor.name)) and all(
                slot == _WEIGHT_SLOTS.get(op) for op, slot in readers[tensor.name])
            if weight and (size >= threshold or (external and not size)):
                self.add(tensor, source_dir)
                moved += 1
            elif external:
                _set_inline(tensor, _read(tensor, source_dir))
        for tensor in _attribute_tensors(model.graph):
            if uses_external_data(tensor):
                _set_inline(tensor, _read(tensor, source_dir))
        return moved

    def offloaded_bytes(self, model: onnx.ModelProto) -> int:
        return sum(int(_external(t)["length"]) for t in model.graph.initializer if self.offloaded(t))

    def load_all(self, model: onnx.ModelProto) -> None:
        """Put every offloaded tensor's bytes back into ``model`` (for passes that read or rewrite weights)."""
        for tensor in model.graph.initializer:
            if self.offloaded(tensor):
                _set_inline(tensor, _read(tensor, self.directory))

    def save(self, model: onnx.ModelProto, path: Path, location: str, size_threshold: int = 1024) -> bool:
        """Write ``model`` to ``path``: in one file if it fits protobuf's 2 GB limit, else with its weights of at
        least ``size_threshold`` bytes in ``location`` beside it, streamed one tensor at a time. Returns whether
        the weights went to ``location``."""
        if model.ByteSize() + self.offloaded_bytes(model) < INLINE_LIMIT:
            self.load_all(model)
            onnx.save_model(model, str(path))
            return False
        written = 0
        with (path.parent / location).open("wb") as out:
            for tensor in model.graph.initializer:
                if self.offloaded(tensor):
                    data = _read(tensor, self.directory)
                elif not uses_external_data(tensor) and len(tensor.raw_data) >= size_threshold:
                    data = tensor.raw_data
                else:
                    continue
                out.write(data)
                _point(tensor, location, written, len(data))
                written += len(data)
        onnx.save_model(model, str(path))
        return True
