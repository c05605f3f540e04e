"""Weight quantisation of optimised graphs: int8 dynamic, 8- and 4-bit MatMulNBits, low-rank factors included; how each
factor pair is split before quantising; the manifest's record; bad settings refused before any work."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import TOL, export_and_optimise, lm_decoder, snr_db, tiny_encoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import OptimizeConfig, PipelineConfig
from fwsvd_deploy.errors import ConfigError
from fwsvd_deploy.exporters import optimize_onnx
from fwsvd_deploy.exporters.lowrank import _balanced, _svd_split, find_pairs, resplit_factors
from fwsvd_deploy.exporters.quantize import check_runs_on, weight_bytes
from fwsvd_deploy.exporters.runtime import make_session, parity_inputs, run_session

TASK = "text-generation-with-past"


def _compressed(root, model, tokenizer, name):
    folder = root / name
    report = compress(model, CompressionConfig(method="svd", ratio=0.5))
    save_compressed(model, folder, tokenizer, report=report)
    return folder


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, lm_tokenizer):
    """A tiny compressed Llama (grouped-query attention), exported with its cache and optimised (float32)."""
    root = tmp_path_factory.mktemp("quantize")
    return export_and_optimise(_compressed(root, lm_decoder("llama", lm_tokenizer), lm_tokenizer, "llama"), TASK)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("quantize-encoder")
    return export_and_optimise(_compressed(root, tiny_encoder("bert", "text-classification"), tokenizer, "bert"),
                               "text-classification")


@pytest.fixture(scope="module")
def quantized(decoder, tmp_path_factory):
    """The decoder quantised once per setting."""
    root = tmp_path_factory.mktemp("quantized")
    _, exported, _ = decoder
    return functools.cache(lambda **kw: optimize_onnx(
        exported.out_dir, OptimizeConfig(**kw), root / "-".join(f"{k}-{v}" for k, v in sorted(kw.items()))))


def _ranged(seed=0, rank=8):
    rng = np.random.default_rng(seed)
    # the compression's form: the inverse whitening's wide range in the down factor, the singular values in the up
    down = (rng.standard_normal((64, rank)) * rng.lognormal(0, 1.5, (64, 1))).astype(np.float32)
    up = (rng.standard_normal((rank, 48)) * np.logspace(2, -2, rank)[:, None]).astype(np.float32)
    return down, up


def test_balanced_split_keeps_the_product_bit_for_bit_and_evens_the_ranges():
    down, up = _ranged()
    d, u = _balanced(down, up)
    assert np.array_equal(d @ u, down @ up)
    ratio = np.abs(d).max(axis=0) / np.abs(u).max(axis=1)
    assert np.all((ratio >= 0.5) & (ratio <= 2.0))  # within one power of two of even
    before = np.abs(down).max(axis=0) / np.abs(up).max(axis=1)
    assert before.max() / before.min() > 1e3  # it had something to even out


def test_svd_split_keeps_the_product_and_gives_orthogonal_scaled_columns():
    down, up = _ranged(1)
    d, u = _svd_split(down, up)
    ref = down.astype(np.float64) @ up
    assert np.abs(d @ u - ref).max() <= TOL["identity_rel"] * np.abs(ref).max()
    gram = d.T.astype(np.float64) @ d
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-4 * gram.max())
    assert np.allclose(np.linalg.norm(d, axis=0), np.linalg.norm(u, axis=1), rtol=1e-4)


def _pair_graph(down, up):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, down.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, up.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "D"], ["h"], name="down"), helper.make_node("MatMul", ["h", "U"], ["z"],
                                                                                     name="up"),
         helper.make_node("Relu", ["z"], ["y"])],
        "pair", [x], [y], [numpy_helper.from_array(down, "D"), numpy_helper.from_array(up, "U")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("split", ["balanced", "svd"])
def test_resplit_rewrites_the_pairs_of_a_graph_in_place(split):
    down, up = _ranged(2)
    model, done = resplit_factors(_pair_graph(down, up), split)
    assert done == 1 and len(find_pairs(model)) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not np.array_equal(inits["D"], down)
    np.testing.assert_allclose(inits["D"] @ inits["U"], down @ up, rtol=0, atol=1e-5 * np.abs(down @ up).max())
    assert resplit_factors(_pair_graph(down, up), "exported")[1] == 0


def test_a_factor_read_by_another_layer_is_left_alone():
    down, up = _ranged(3)
    model = _pair_graph(down, up)
    model.graph.node.append(helper.make_node("MatMul", ["x", "D"], ["again"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("again", onnx.TensorProto.FLOAT, None))
    assert resplit_factors(model, "balanced")[1] == 0


@pytest.mark.parametrize("scheme", ["int8", "int8-weight", "int4"])
def test_quantised_factors_of_the_decoder_pass_their_floors(quantized, decoder, scheme):
    _, _, fp32 = decoder
    result = quantized(quantize=scheme)
    cfg = OptimizeConfig(quantize=scheme)
    rows = result.parity["shapes"]
    assert result.parity["passed"] and result.parity["tolerance"]["atol"] is None
    assert min(r["sqnr_db"] for r in rows) >= cfg.floors[0] and min(r["agreement"] for r in rows) >= cfg.floors[1]
    q = result.quantization
    assert q.scheme == scheme and q.factors == 2 * fp32.low_rank_layers and q.factors_quantized == q.factors
    assert q.quantized == q.matmuls - 1 and q.kept_float == [q.head] and not q.head_quantized  # the LM head
    assert result.fusions == fp32.fusions and result.low_rank_layers == fp32.low_rank_layers
    ops = result.operators
    nbits = scheme != "int8"
    kinds = ("MatMulNBits",) if nbits else ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    assert sum(ops.get(o, 0) for o in kinds) == q.quantized
    assert q.bits == (4 if scheme == "int4" else 8) and (q.block_size == 32) == nbits
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["quantization"]["quantized"] == q.quantized and manifest["settings"]["quantize"] == scheme
    model = onnx.load(str(result.onnx_path))
    floats = weight_bytes(model)
    assert floats == q.weight_bytes and floats[scheme.removesuffix("-weight")] > 0 and floats["scales"] > 0
    if nbits:
        assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "bits"} == {q.bits}
    # only the head is left float among the weights matrix products read
    weight = next(n.input[1] for n in model.graph.node if n.name == q.head)
    producer = {o: n for n in model.graph.node for o in n.output}
    if weight in producer:  # the head tied to the embeddings reads Transpose(embeddings)
        weight = producer[weight].input[0]
    head = next(i for i in model.graph.initializer if i.name == weight)
    assert floats["float"] == int(np.prod(head.dims)) * 4


def test_eight_bit_weights_keep_far_more_signal_than_four(quantized):
    """int8-weight's worst shape holds more signal than int4's best, by the 24 dB four more bits give a weight."""
    eight, four = (quantized(quantize=s).parity["shapes"] for s in ("int8-weight", "int4"))
    assert min(r["sqnr_db"] for r in eight) > max(r["sqnr_db"] for r in four) + 10
    int8 = quantized(quantize="int8-weight").quantization.weight_bytes
    int4 = quantized(quantize="int4").quantization.weight_bytes
    assert int8["int8"] == 2 * int4["int4"] and int8["float"] == int4["float"]


def test_eight_bit_weights_take_the_cpu_fast_kernel_unless_told_otherwise(quantized):
    def levels(result):
        return {a.i for n in onnx.load(str(result.onnx_path)).graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "accuracy_level"} or {0}

    assert OptimizeConfig(quantize="int8-weight").matmul_accuracy_level == 4
    assert OptimizeConfig(quantize="int8-weight", device="cuda").matmul_accuracy_level == 0
    assert OptimizeConfig(quantize="int4").matmul_accuracy_level == 0
    auto, exact = quantized(quantize="int8-weight"), quantized(quantize="int8-weight", accuracy_level=0)
    assert levels(auto) == {4} and auto.quantization.accuracy_level == 4 and auto.parity["passed"]
    assert levels(exact) == {0} and exact.quantization.accuracy_level == 0
    assert levels(quantized(quantize="int4")) == {0}


def test_int4_block_and_head_settings_are_applied(quantized):
    default = quantized(quantize="int4")
    wide = quantized(quantize="int4", block_size=64, symmetric=True)
    head = quantized(quantize="int4", quantize_lm_head=True)
    blocks = {a.i for r in (wide,) for n in onnx.load(str(r.onnx_path)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {64} and wide.quantization.block_size == 64 and wide.quantization.symmetric
    assert wide.quantization.weight_bytes["scales"] < default.quantization.weight_bytes["scales"]
    assert head.quantization.head_quantized and head.quantization.kept_float == []
    assert head.quantization.weight_bytes["float"] == 0
    assert head.quantization.weight_bytes["int4"] > default.quantization.weight_bytes["int4"]


def test_hqq_fits_each_blocks_scale_and_zero_point(quantized):
    """HQQ's 4-bit blocks keep more of the signal than round to nearest's, with float zero points (more bytes of
    scales), at the accuracy level int4 runs at."""
    scheme = "int4"
    rtn, hqq = quantized(quantize=scheme), quantized(quantize=scheme, quantizer="hqq")
    assert hqq.parity["passed"] and hqq.quantization.quantizer == "hqq" and rtn.quantization.quantizer == "rtn"
    assert min(r["sqnr_db"] for r in hqq.parity["shapes"]) > min(r["sqnr_db"] for r in rtn.parity["shapes"])
    assert hqq.quantization.factors_quantized == rtn.quantization.factors_quantized > 0
    sizes = hqq.quantization.weight_bytes, rtn.quantization.weight_bytes
    assert sizes[0]["scales"] > sizes[1]["scales"] and sizes[0]["int4"] == sizes[1]["int4"]
    nodes = [n for n in onnx.load(str(hqq.onnx_path)).graph.node if n.op_type == "MatMulNBits"]
    level = OptimizeConfig(quantize=scheme).matmul_accuracy_level
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == ({level} if level else set())
    assert all(len(n.input) >= 4 and n.input[3] for n in nodes)  # zero points, float
    manifest = json.loads((hqq.out_dir / "manifest.json").read_text())
    assert manifest["quantization"]["quantizer"] == "hqq" and manifest["settings"]["quantizer"] == "hqq"
    fast = quantized(quantize=scheme, quantizer="hqq", accuracy_level=4)  # written by us: HQQ's quantiser does not
    nodes = [n for n in onnx.load(str(fast.onnx_path)).graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4} and fast.parity["passed"]


def test_hqq_for_the_cpu_warns_that_it_is_slow_there(decoder, tmp_path, caplog):
    _, exported, _ = decoder
    with caplog.at_level(logging.WARNING, logger="fwsvd_deploy"):
        optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int4", quantizer="hqq"), tmp_path / "q")
    assert any("no fast kernel for float zero points" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fwsvd_deploy"):
        optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int4"), tmp_path / "r")
    assert not any("float zero points" in r.getMessage() for r in caplog.records)


def test_hqq_weights_do_not_depend_on_a_visible_gpu(decoder, tmp_path, monkeypatch):
    """ONNX Runtime's HQQ fits the weights on a GPU in float16 when torch sees one; ours always on the CPU."""
    import torch

    _, exported, _ = decoder
    cfg = OptimizeConfig(quantize="int4", quantizer="hqq")
    here = optimize_onnx(exported.out_dir, cfg, tmp_path / "here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # would move the weights to a missing device
    seen = optimize_onnx(exported.out_dir, cfg, tmp_path / "seen")
    a = {i.name: i.raw_data for i in onnx.load(str(here.onnx_path)).graph.initializer}
    b = {i.name: i.raw_data for i in onnx.load(str(seen.onnx_path)).graph.initializer}
    assert a == b


@pytest.mark.parametrize("split", ["balanced", "exported"])
def test_the_factor_split_changes_the_weights_not_the_float_function(quantized, split):
    """Every split quantises every factor, to other weights than the default (svd) split's."""
    default, other = quantized(quantize="int4"), quantized(quantize="int4", factor_split=split)
    assert default.quantization.factor_split == "svd" and other.quantization.factor_split == split
    assert default.parity["passed"] and other.parity["passed"]
    assert other.quantization.factors_quantized == default.quantization.factors_quantized > 0
    a = {i.name: i.raw_data for i in onnx.load(str(default.onnx_path)).graph.initializer}
    b = {i.name: i.raw_data for i in onnx.load(str(other.onnx_path)).graph.initializer}
    assert any(a[k] != b[k] for k in a.keys() & b.keys())


def test_quantised_encoders_stay_close_to_float(encoder, tmp_path, tokenizer):
    _, exported, fp32 = encoder
    reference = make_session(exported.onnx_path, "cpu")
    for scheme in ("int8", "int8-weight", "int4"):
        result = optimize_onnx(exported.out_dir, OptimizeConfig(quantize=scheme), tmp_path / scheme)
        q = result.quantization
        # q, k and v share one down-projection in the fused attention: fewer factor weights than 2 per layer
        assert result.parity["passed"] and fp32.low_rank_layers < q.factors_quantized == q.factors
        candidate = make_session(result.onnx_path, "cpu")
        inputs = parity_inputs(tokenizer, [i.name for i in candidate.get_inputs()], 4, 19)
        want, got = run_session(reference, inputs)["logits"], run_session(candidate, inputs)["logits"]
        assert snr_db(want, got) >= TOL[f"{scheme}_snr_db"]


@pytest.mark.parametrize(("settings", "match"), [
    ({"quantize": "int4", "block_size": 48}, "power of two"),
    ({"quantize": "int4", "block_size": 512}, "power of two"),
    ({"quantize": "int4", "accuracy_level": 5}, "accuracy_level"),
    ({"block_size": 64}, "MatMulNBits only"),
    ({"quantize": "int8", "symmetric": True}, "MatMulNBits only"),
    ({"quantize": "int8-weight", "block_size": 24}, "power of two"),
    ({"quantize": "int8-weight", "per_channel": True}, "int8 only"),
    ({"quantize": "int4", "per_channel": True}, "int8 only"),
    ({"quantize_lm_head": True}, "without quantize"),
    ({"quantize": "int8", "device": "cuda"}, "CPU provider"),
    ({"quantize": "int4", "device": "cuda", "fp16": True}, "not both"),
    ({"quantize": "int2"}, "choose one of"),
    ({"quantize": "int4", "factor_split": "halves"}, "choose one of"),
    ({"quantize": "int4", "quantizer": "gptq"}, "choose one of"),
    ({"quantize": "int4", "quantizer": "hqq", "symmetric": True}, "zero point"),
    ({"quantize": "int8", "quantizer": "hqq"}, "MatMulNBits only"),
    ({"quantize": "int8-weight", "quantizer": "hqq"}, "4 bits only"),
    ({"quantizer": "hqq"}, r"MatMulNBits only \(--quantize int4\)"),
])
def test_bad_quantisation_settings_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        OptimizeConfig(**settings)


def test_accuracy_level_zero_is_the_unset_level_and_old_runtimes_are_refused(decoder, tmp_path, monkeypatch):
    assert OptimizeConfig(quantize="int8", accuracy_level=0).matmul_accuracy_level == 0
    assert OptimizeConfig(accuracy_level=0).quantize is None
    import onnxruntime

    _, exported, _ = decoder
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(ConfigError, match="int8-weight needs ONNX Runtime 1.22 or newer"):
        optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int8-weight"), tmp_path / "old")
    assert not (tmp_path / "old").exists()


def test_int8_spelling_and_pipeline_yaml():
    assert OptimizeConfig.from_dict({"int8": True}).quantize == "int8"
    with pytest.raises(ConfigError, match="contradicts"):
        OptimizeConfig.from_dict({"int8": True, "quantize": "int4"})
    cfg = PipelineConfig.from_dict({"task": "causal-lm", "optimize": {"quantize": "int4", "block_size": 64}})
    assert cfg.optimize.quantize == "int4" and cfg.optimize.block_size == 64 and cfg.optimize.floors == (2.0, 0.1)


def test_a_block_that_does_not_divide_the_hidden_size_is_refused(decoder, tmp_path):
    _, exported, _ = decoder  # hidden size 64
    with pytest.raises(ConfigError, match="does not divide the hidden size 64"):
        optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int4", block_size=128), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_quantised_graph_is_refused_for_quantisation_and_for_providers_without_its_kernels(quantized, tmp_path):
    int4 = quantized(quantize="int4")
    with pytest.raises(ConfigError, match="quantised already"):
        optimize_onnx(int4.out_dir, OptimizeConfig(quantize="int8"), tmp_path / "again")
    assert not (tmp_path / "again").exists()
    check_runs_on(int4.onnx_path, "cuda")
    with pytest.raises(ConfigError, match="tensorrt provider has no MatMulNBits"):
        check_runs_on(int4.onnx_path, "tensorrt")
    with pytest.raises(ConfigError, match="cuda provider has no int8"):
        check_runs_on(quantized(quantize="int8").onnx_path, "cuda")
    eight = quantized(quantize="int8-weight")
    check_runs_on(eight.onnx_path, "cuda")
    with pytest.raises(ConfigError, match="quantised to int8-weight, and the tensorrt provider has no MatMulNBits"):
        check_runs_on(eight.onnx_path, "tensorrt")
    with pytest.raises(ConfigError, match=r"quantised already \(int8-weight"):
        optimize_onnx(eight.out_dir, OptimizeConfig(quantize="int4"), tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(("args", "match"), [
    (["--quantize", "int4", "--block-size", "24"], "power of two"),
    (["--quantize", "int4", "--block-size", "128"], "does not divide"),
    (["--block-size", "64"], "MatMulNBits only"),
    (["--quantize", "int8-weight", "--block-size", "128"], "does not divide"),
    (["--int8", "--device", "cuda"], "CPU provider"),
])
def test_cli_refuses_bad_quantisation_with_exit_2(decoder, tmp_path, capsys, args, match):
    _, exported, _ = decoder
    assert main(["optimize", "--onnx", str(exported.out_dir), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and not (tmp_path / "o").exists()


def test_cli_quantises_and_reports(decoder, tmp_path, capsys):
    _, exported, _ = decoder
    assert main(["optimize", "--onnx", str(exported.out_dir), "--out", str(tmp_path / "o"), "--quantize", "int4",
                 "--block-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "quantised (int4, rtn, block 32, accuracy level 0)" in out and "head kept float" in out
    assert "signal-to-noise" in out
    assert main(["optimize", "--onnx", str(tmp_path / "o"), "--out", str(tmp_path / "p"), "--quantize", "int8"]) == 2
    assert "quantised already" in capsys.readouterr().err and not (tmp_path / "p").exists()
