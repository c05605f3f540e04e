"""Offloaded weights: a decoder optimised with its weights waiting in a file is the graph it is optimised in memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

from conftest import lm_model_folder
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.exporters import export_onnx, optimize_onnx, weights

TASK = "text-generation-with-past"


def _arrays(model: onnx.ModelProto, base_dir: str = "") -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, lm_tokenizer):
    root = tmp_path_factory.mktemp("offload")
    folder = lm_model_folder(root, lm_tokenizer, "llama", "svd")
    return export_onnx(folder, ExportConfig(task=TASK), root / "onnx").out_dir


@pytest.mark.parametrize("external", [False, True])
def test_store_round_trips_every_tensor(exported, tmp_path, monkeypatch, external):
    model = onnx.load(str(exported / "model.onnx"))
    want = _arrays(model)
    store = weights.WeightStore(tmp_path / "store")
    moved = store.offload(model, threshold=256)
    assert moved >= 20 and store.offloaded_bytes(model) > 4 * model.ByteSize()
    got = _arrays(model, str(store.directory))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    if external:  # as a model past protobuf's 2 GB limit is saved
        monkeypatch.setattr(weights, "INLINE_LIMIT", 0)
    out = tmp_path / "saved"
    out.mkdir()
    assert store.save(model, out / "model.onnx", "model.onnx_data") is external
    assert (out / "model.onnx_data").is_file() is external
    reloaded = _arrays(onnx.load(str(out / "model.onnx")))
    assert all(np.array_equal(reloaded[k], want[k]) for k in want)


def _graph(folder) -> tuple[list, dict[str, np.ndarray]]:
    model = onnx.load(str(folder / "model.onnx"))
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output)) for n in model.graph.node]
    return nodes, _arrays(model)


@pytest.mark.parametrize("external_source", [False, True])
def test_offloaded_optimisation_writes_the_in_memory_graph(exported, tmp_path, monkeypatch, lm_tokenizer,
                                                            external_source):
    source = exported
    if external_source:  # weights in the export's own data file, read from it one tensor at a time
        folder = lm_model_folder(tmp_path, lm_tokenizer, "llama", "svd")
        source = export_onnx(folder, ExportConfig(task=TASK, external_data=True), tmp_path / "onnx-ext").out_dir
        # as optimum saves a model past 2 GB: the Constants' values in a data file too
        model = onnx.load(str(source / "model.onnx"))
        offset = 0
        with (source / "constants.bin").open("wb") as f:
            for node in model.graph.node:
                value = node.attribute[0].t if node.op_type == "Constant" else None
                if value is not None and len(value.raw_data) >= 16:
                    f.write(value.raw_data)
                    set_external_data(value, "constants.bin", offset, len(value.raw_data))
                    offset += len(value.raw_data)
                    value.ClearField("raw_data")
        (source / "model.onnx_data").unlink()
        onnx.save_model(model, str(source / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
        stored = onnx.load(str(source / "model.onnx"), load_external_data=False)
        assert any(weights.uses_external_data(t) for t in weights._attribute_tensors(stored.graph))
    monkeypatch.setattr(weights, "OFFLOAD_BYTES", 1 << 40)  # nothing inline offloaded: the graph as in memory
    in_memory = optimize_onnx(source, OptimizeConfig(), tmp_path / "memory")
    monkeypatch.setattr(weights, "OFFLOAD_BYTES", 256)  # every factor, product and embedding table offloaded
    offloaded = optimize_onnx(source, OptimizeConfig(), tmp_path / "offloaded")
    assert offloaded.parity["passed"] and offloaded.fusions == in_memory.fusions
    assert offloaded.low_rank_layers == in_memory.low_rank_layers > 0
    want_nodes, want = _graph(in_memory.out_dir)
    got_nodes, got = _graph(offloaded.out_dir)
    assert got_nodes == want_nodes
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in offloaded.out_dir.iterdir()) == sorted(p.name for p in in_memory.out_dir.iterdir())
