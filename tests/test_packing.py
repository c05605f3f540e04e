"""Joining the MatMuls that read one tensor: what is joined, what is left, and that the values do not change."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import LM_DECODER_CONFIGS, lm_model_folder
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.errors import ConfigError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.decoder import OnnxDecoder, positions_of, prefill_rows
from fwsvd_deploy.exporters.packing import pack_shared_inputs, shared_input_groups
from fwsvd_deploy.exporters.quantize import factor_weights
from fwsvd_deploy.exporters.runtime import make_session


def _graph(opset: int = 17) -> onnx.ModelProto:
    """x feeds five MatMuls: a and b by weights of their own, c by a weight that is also a graph input, d by a weight
    e reads too, h whose output is a graph output; f reads another tensor."""
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((8, k)).astype(np.float32) for n, k in (("wa", 5), ("wb", 3), ("wc", 5),
                                                                             ("wd", 5), ("wh", 4), ("wa2", 2))}
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="ma"),
        helper.make_node("Relu", ["x"], ["rx"]),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="mb"),
        helper.make_node("MatMul", ["x", "wc"], ["c"], name="mc"),
        helper.make_node("MatMul", ["x", "wd"], ["d"], name="md"),
        helper.make_node("MatMul", ["x", "wh"], ["h"], name="mh"),
        helper.make_node("MatMul", ["rx", "wd"], ["e"], name="me"),
        helper.make_node("MatMul", ["rx", "wa2"], ["f"], name="mf"),
        helper.make_node("Concat", ["a", "b", "f"], ["abf"], axis=-1),
        helper.make_node("Add", ["c", "d"], ["cd"]),
        helper.make_node("Add", ["cd", "e"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
                     helper.make_tensor_value_info("wc", TensorProto.FLOAT, [8, 5])],  # a weight one may feed
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", k]) for o, k in (("y", 5), ("abf", 10), ("h", 4))],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_a_weight_that_may_be_fed_stays_a_weight_one_can_feed():
    packed, _ = pack_shared_inputs(_graph())
    import onnxruntime as ort

    session = ort.InferenceSession(packed.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]  # nothing else required
    assert [i.name for i in session.get_overridable_initializers()] == ["wc"]


@pytest.mark.parametrize("opset", [11, 17])
def test_matmuls_reading_one_tensor_become_one_and_compute_the_same(opset):
    model = _graph(opset)
    groups = shared_input_groups(model)
    # c's weight may be fed, d's is read by e too, h is a graph output, f is alone on rx: only a and b join
    assert [[n.name for n in g] for g in groups] == [["ma", "mb"]]
    packed, removed = pack_shared_inputs(model)
    assert removed == 1
    onnx.checker.check_model(packed)
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMul") == 6 and ops.count("Split") == 1
    names = {i.name for i in packed.graph.initializer}
    assert "wa" not in names and "wb" not in names and {"wc", "wd", "wh", "wa2"} <= names
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    for got, want in zip(_run(packed, x), _run(model, x), strict=True):
        np.testing.assert_array_equal(got, want)
    assert pack_shared_inputs(packed) == (packed, 0)  # nothing left to join
    assert [n.name for n in model.graph.node][:3] == ["ma", "", "mb"]  # the input graph is not changed


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory, lm_tokenizer):
    root = tmp_path_factory.mktemp("packing")
    return {variant: export_onnx(lm_model_folder(root, lm_tokenizer, "llama", variant),
                                 ExportConfig(task="text-generation-with-past"), root / f"{variant}-onnx")
            for variant in ("baseline", "svd")}


@pytest.mark.parametrize(("variant", "mode", "joined"), [
    ("baseline", "all", 3), ("baseline", "factors", 0), ("svd", "all", 3), ("svd", "factors", 3)])
def test_a_decoders_projections_and_their_down_factors_are_joined(llama_exports, tmp_path, lm_tokenizer, variant,
                                                                   mode, joined):
    """q/k/v and gate/up (dense, with ``all``), or their down-projections (factorised): three MatMuls fewer per
    block; the same logits as the graph optimised without joining, parity checked by the optimiser on both."""
    exported = llama_exports[variant]
    packed = optimize_onnx(exported.out_dir, OptimizeConfig(pack_matmuls=mode), tmp_path / "packed")
    plain = optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "plain")
    layers = LM_DECODER_CONFIGS["llama"]().num_hidden_layers
    assert packed.parity["passed"] and plain.parity["passed"]
    assert (packed.packed_matmuls, plain.packed_matmuls) == (joined * layers, 0)
    assert packed.operators["MatMul"] == plain.operators["MatMul"] - joined * layers
    assert packed.operators.get("Split", 0) == plain.operators.get("Split", 0) + 2 * layers * (joined > 0)
    assert packed.fusions == plain.fusions and packed.fusions_complete
    manifest = json.loads((packed.out_dir / "manifest.json").read_text())
    assert manifest["packed_matmuls"] == joined * layers and manifest["settings"]["pack_matmuls"] == mode
    # the factors are still found as factors (what weight quantisation counts): each up, one down per joined group
    factors = factor_weights(onnx.load(str(packed.onnx_path)))
    assert len(factors) == (0 if variant == "baseline" else 2 * plain.low_rank_layers - joined * layers)
    ids, mask = prefill_rows(lm_tokenizer, 2, 9)
    positions = positions_of(mask)
    got, _ = OnnxDecoder(make_session(packed.onnx_path)).start(ids, mask, positions)
    want, _ = OnnxDecoder(make_session(plain.onnx_path)).start(ids, mask, positions)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("settings", "match"), [
    ({"pack_matmuls": True}, "choose one of"),
    ({"pack_matmuls": "some"}, "choose one of"),
    ({"pack_matmuls": "all", "level": "O1"}, "makes no graph rewrites"),
    ({"pack_matmuls": "factors", "quantize": "int8"}, "one scale per weight tensor"),
])
def test_bad_packing_settings_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        OptimizeConfig(**settings)
    OptimizeConfig(**{**settings, "pack_matmuls": "none"})  # the rest is fine alone


def test_cli_refuses_packing_that_does_not_apply(llama_exports, tmp_path, capsys):
    from fwsvd_deploy.cli import main

    exported = llama_exports["baseline"]
    assert main(["optimize", "--onnx", str(exported.out_dir), "--out", str(tmp_path / "o"), "--int8",
                 "--pack-matmuls", "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pack_matmuls" in err[0] and not (tmp_path / "o").exists()


def test_int4_quantises_the_joined_factors(llama_exports, tmp_path):
    """MatMulNBits quantises a joined weight block by block, column by column; every factor is still a factor."""
    exported = llama_exports["svd"]
    int4 = optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int4", pack_matmuls="factors"), tmp_path / "int4")
    assert int4.packed_matmuls > 0 and int4.parity["passed"]
    assert int4.quantization.factors_quantized == int4.quantization.factors > 0
