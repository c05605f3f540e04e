"""ONNX export and low-rank-aware optimisation, on tiny models of every supported architecture and task."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import ENCODER_CONFIGS, TASK_CLASSES, TOL, export_and_optimise, snr_db, tiny_encoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.compression.targets import resolve_targets
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.errors import ConfigError, DeviceUnavailableError, ExportError, OutputExistsError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.runtime import make_session, parity_inputs, parity_report, run_session

VARIANTS = ("baseline", "svd", "fwsvd")
BERT_FAMILY = ("bert", "roberta", "electra")


def _synthetic_fisher(model, seed=0):
    """A positive, uneven importance per weight: the export path only sees the factors FWSVD produces."""
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.rand(t.module.weight.shape, generator=g) ** 3 + 1e-4 for t in resolve_targets(model)}


def _model_folder(tmp_path, tokenizer, arch, task, variant):
    model = tiny_encoder(arch, task)
    folder = tmp_path / f"{arch}-{task}-{variant}"
    if variant == "baseline":
        save_model(model, folder, tokenizer)
    else:
        method, _, qkv = variant.partition("-")
        fisher = _synthetic_fisher(model) if method == "fwsvd" else None
        report = compress(model, CompressionConfig(method=method, ratio=0.5, qkv=qkv or "separate"), fisher)
        save_compressed(model, folder, tokenizer, report=report)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """Lazily export + optimise each (arch, task, variant) once per module."""
    root = tmp_path_factory.mktemp("onnx")
    return functools.cache(lambda arch, task, variant: export_and_optimise(
        _model_folder(root, tokenizer, arch, task, variant), task))


@pytest.mark.parametrize(("arch", "task", "variant"),
                         list(itertools.product(ENCODER_CONFIGS, TASK_CLASSES, VARIANTS)))
def test_export_and_optimise_keep_parity(built, arch, task, variant):
    _, exported, optimized = built(arch, task, variant)
    assert exported.parity["passed"] and exported.parity["max_abs_diff"] <= TOL["onnx_vs_torch"]
    shapes = {(r["batch"], r["sequence"]) for r in exported.parity["shapes"]}
    assert (2, 16) not in shapes and len(shapes) == 2  # validated on shapes other than the export's
    assert optimized.parity["passed"] and optimized.parity["max_abs_diff"] <= TOL["optimised_graph"]
    assert exported.compressed == (variant != "baseline")
    if variant == "baseline":
        assert optimized.low_rank_layers == 0
    else:
        # every factorised linear is a MatMul pair in the graph; ALBERT's one shared layer appears once per use
        factorised = len(resolve_targets(tiny_encoder(arch, task)))
        layers = ENCODER_CONFIGS[arch]().num_hidden_layers
        assert optimized.low_rank_layers == factorised * (layers if arch == "albert" else 1)
    onnx.checker.check_model(str(optimized.onnx_path))
    manifest = json.loads((optimized.out_dir / "manifest.json").read_text())
    assert manifest["fusions"] == optimized.fusions and manifest["parity"]["passed"]
    assert len(manifest["input"]["fingerprint"]) == 64 and "onnxruntime" in manifest["versions"]


@pytest.mark.parametrize("arch", BERT_FAMILY)
@pytest.mark.parametrize("variant", ["svd", "fwsvd"])
def test_compressed_graph_keeps_every_fusion_of_the_baseline(built, arch, variant):
    base = built(arch, "text-classification", "baseline")[2]
    comp = built(arch, "text-classification", variant)[2]
    layers = ENCODER_CONFIGS[arch]().num_hidden_layers
    assert base.fusions["attention"] == layers and base.fusions["skip_layer_norm"] == 2 * layers
    assert base.fusions["gelu"] >= layers  # ELECTRA's head has one more
    # ONNX Runtime fuses RoBERTa's embeddings only when position ids are an input; BERT and ELECTRA always
    assert base.fusions["embed_layer_norm"] == (0 if arch == "roberta" else 1)
    assert comp.fusions == base.fusions  # per fused family, count for count
    assert comp.fusions_complete and comp.reference_fusions == base.fusions
    assert comp.operators.get("MultiHeadAttention") == layers and "Attention" not in comp.operators
    assert comp.low_rank_layers == 6 * layers


@pytest.mark.parametrize("arch", [*BERT_FAMILY, "distilbert"])
def test_joint_qkv_runs_as_the_fused_attention_operator(built, arch):
    """q/k/v sharing one down-projection: one MatMul by it, then the very Attention operator of the baseline."""
    base = built(arch, "text-classification", "baseline")[2]
    folder, exported, comp = built(arch, "text-classification", "fwsvd-joint")
    layers = ENCODER_CONFIGS[arch]().num_hidden_layers
    assert exported.parity["passed"] and comp.parity["passed"]
    assert comp.fusions == base.fusions and comp.fusions_complete
    assert comp.operators.get("Attention") == layers and "MultiHeadAttention" not in comp.operators
    assert comp.low_rank_layers == 6 * layers  # three up-projections on one down, the output and two FFN pairs
    graph = onnx.load(str(comp.onnx_path)).graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    plan = json.loads((folder / "compression.json").read_text())["layers"]
    rank = next(v["rank"] for v in plan.values() if "shared_down" in v)
    for node in (n for n in graph.node if n.op_type == "Attention"):
        assert inits[node.input[1]][0] == rank  # the packed weight is the up-projections: rank x 3 * hidden


@pytest.mark.parametrize("variant", ["fwsvd", "fwsvd-joint"])
def test_fused_compressed_graph_matches_pytorch(built, tokenizer, variant):
    """End to end: PyTorch compressed model vs its optimised, fused ONNX graph, on padded batches."""
    from fwsvd_deploy import load_compressed

    folder, _, optimized = built("bert", "text-classification", variant)
    model = load_compressed(folder)
    session = make_session(optimized.onnx_path)
    inputs = parity_inputs(tokenizer, [i.name for i in session.get_inputs()], 4, 29)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(run_session(session, inputs)["logits"], want, atol=TOL["onnx_vs_torch"], rtol=0)


def test_optimised_folder_loads_in_optimum_and_pipeline(built, tokenizer):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import pipeline

    _, _, optimized = built("bert", "text-classification", "fwsvd")
    ort_model = ORTModelForSequenceClassification.from_pretrained(optimized.out_dir)
    session = make_session(optimized.onnx_path)
    inputs = parity_inputs(tokenizer, [i.name for i in session.get_inputs()], 3, 17)
    out = ort_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(out, run_session(session, inputs)["logits"], atol=TOL["same_graph"], rtol=0)
    classify = pipeline("text-classification", model=ort_model, tokenizer=tokenizer)
    assert len(classify(["fine", "awful film"])) == 2


@pytest.mark.parametrize("variant", ["baseline", "fwsvd"])
def test_int8_runs_on_cpu_within_tolerance(built, tmp_path, variant, tokenizer):
    _, exported, _ = built("bert", "text-classification", variant)
    result = optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int8"), tmp_path / "int8")
    assert result.parity["passed"]
    # int8 weights are lossy: their outputs are held to a signal-to-noise floor against the float32 graph
    reference, quantised = make_session(exported.onnx_path), make_session(result.onnx_path)
    inputs = parity_inputs(tokenizer, [i.name for i in reference.get_inputs()], 5, 19)
    want, got = run_session(reference, inputs)["logits"], run_session(quantised, inputs)["logits"]
    assert snr_db(want, got) >= TOL["int8_snr_db"]
    ops = result.operators
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) + ops.get("QAttention", 0) > 0
    assert result.fusions["attention"] == 2 and result.fusions["embed_layer_norm"] == 1


def test_fp16_cuda_graph_is_written_and_refuses_to_run_without_cuda(built, tmp_path):
    import onnxruntime as ort

    _, exported, _ = built("bert", "text-classification", "fwsvd")
    result = optimize_onnx(exported.out_dir, OptimizeConfig(device="cuda", fp16=True), tmp_path / "fp16")
    model = onnx.load(str(result.onnx_path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in model.graph.output)
    assert result.parity is None and result.fusions["attention"] == 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            make_session(result.onnx_path, "cuda")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceUnavailableError, match="TensorRT is not available"):
            make_session(result.onnx_path, "tensorrt")


@pytest.mark.parametrize(("device", "used", "refused"), [
    ("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], False),
    ("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"], True),  # libnvinfer missing: ORT fell back
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], False),
    ("cuda", ["CPUExecutionProvider"], True),  # cuDNN missing or no GPU: ORT fell back
    ("cpu", ["CPUExecutionProvider"], False),
])
def test_a_session_moved_off_its_provider_is_refused(device, used, refused):
    from fwsvd_deploy.exporters.runtime import check_session_provider

    if not refused:
        check_session_provider(used, device)
        return
    with pytest.raises(DeviceUnavailableError, match=f"fell back to {used[0]}") as caught:
        check_session_provider(used, device)
    assert ("libnvinfer" in str(caught.value)) == (device == "tensorrt")


def test_levels(built, tmp_path):
    _, exported, _ = built("bert", "text-classification", "svd")
    o1 = optimize_onnx(exported.out_dir, OptimizeConfig(level="O1"), tmp_path / "o1")
    o3 = optimize_onnx(exported.out_dir, OptimizeConfig(level="O3"), tmp_path / "o3")
    assert o1.fusions["attention"] == 0 and o1.low_rank_layers == 12
    assert o3.operators.get("FastGelu") == 2 and o3.fusions["attention"] == 2


def test_external_data(tmp_path, tokenizer):
    folder = _model_folder(tmp_path, tokenizer, "bert", "text-classification", "svd")
    result = export_onnx(folder, ExportConfig(external_data=True), tmp_path / "ext")
    assert (tmp_path / "ext" / "model.onnx_data").is_file() and result.parity["passed"]
    assert optimize_onnx(tmp_path / "ext", OptimizeConfig(), tmp_path / "ext-opt").parity["passed"]


def test_bad_inputs(built, tmp_path, tokenizer):
    folder, exported, optimized = built("bert", "text-classification", "svd")
    with pytest.raises(ConfigError, match="already holds an ONNX model"):
        export_onnx(optimized.out_dir, ExportConfig(), tmp_path / "x")
    with pytest.raises(ConfigError, match="cannot be exported for task 'token-classification'"):
        export_onnx(folder, ExportConfig(task="token-classification"), tmp_path / "x")
    with pytest.raises(ConfigError, match="task"):
        ExportConfig(task="translation")
    with pytest.raises(ConfigError, match="too old"):
        ExportConfig(opset=11)
    with pytest.raises(ConfigError, match="fp16 needs device='cuda'"):
        OptimizeConfig(fp16=True)
    with pytest.raises(OutputExistsError):
        optimize_onnx(exported.out_dir, OptimizeConfig(), optimized.out_dir)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(ConfigError, match="not a valid ONNX model"):
        optimize_onnx(garbage, OptimizeConfig(), tmp_path / "y")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (exported.out_dir / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="not a valid ONNX model"):
        optimize_onnx(truncated, OptimizeConfig(), tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def _perturbed(path, out):
    """A copy of an ONNX graph whose classifier bias is shifted: valid, runnable, and wrong."""
    model = onnx.load(str(path))
    bias = next(i for i in model.graph.initializer if i.name.endswith("classifier.bias"))
    bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias) + 0.01, bias.name))
    onnx.save(model, str(out))
    return out


def test_parity_fails_on_a_perturbed_graph(built, tmp_path, tokenizer):
    from fwsvd_deploy import load_compressed
    from fwsvd_deploy.errors import ParityError
    from fwsvd_deploy.exporters.onnx import torch_outputs

    folder, exported, _ = built("bert", "text-classification", "svd")
    model = load_compressed(folder)
    session = make_session(_perturbed(exported.onnx_path, tmp_path / "wrong.onnx"))
    with pytest.raises(ParityError, match="logits at batch 3 x sequence 23: max \\|diff\\| 0.01 > 0.0001"):
        parity_report(session, tokenizer, lambda i, n: torch_outputs(model, i, n), ExportConfig().validate_shapes,
                      ExportConfig().atol, what="ONNX vs PyTorch")


def test_parity_that_compares_nothing_is_an_error(built, tokenizer):
    """A reference that lacks the graph's outputs (or gives others) cannot pass by comparing nothing."""
    from fwsvd_deploy.errors import ParityError

    _, exported, _ = built("bert", "text-classification", "baseline")
    session = make_session(exported.onnx_path)
    for reference in (lambda i, n: {}, lambda i, n: {"last_hidden_state": np.zeros((3, 23, 32))}):
        with pytest.raises(ParityError, match="different outputs"):
            parity_report(session, tokenizer, reference, ((3, 23),), 1e-4, what="ONNX vs PyTorch")


def test_export_parity_compares_the_outputs_pytorch_gives(built, tmp_path, monkeypatch):
    """When PyTorch's output lacks the graph's output, export fails instead of passing on zero comparisons."""
    from fwsvd_deploy.errors import ParityError
    from fwsvd_deploy.exporters import onnx as onnx_export

    folder, _, _ = built("bert", "text-classification", "baseline")
    monkeypatch.setattr(onnx_export, "torch_outputs", lambda model, inputs, names: {})
    with pytest.raises(ParityError, match="different outputs"):
        export_onnx(folder, ExportConfig(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_factorised_layer_the_restore_cannot_find_fails_the_optimisation(built, tmp_path, monkeypatch):
    from fwsvd_deploy.exporters import optimize as optimize_module
    from fwsvd_deploy.exporters.lowrank import LowRankPair

    _, exported, _ = built("bert", "text-classification", "svd")
    real = optimize_module.densify

    def densify_with_a_stranger(model, store=None):
        dense, index = real(model, store)
        down, up = np.ones((32, 2), np.float32), np.ones((2, 5), np.float32)
        index.pairs["not-in-the-graph"] = LowRankPair("d", "u", down, up)
        return dense, index

    monkeypatch.setattr(optimize_module, "densify", densify_with_a_stranger)
    with pytest.raises(ExportError, match="restored 12 of 13 factorised layers"):
        optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _unfuse_one_skip_layer_norm(model):
    """The same function with one SkipLayerNormalization spelled out in plain ONNX operators."""
    from onnx import helper

    nodes = list(model.graph.node)
    i, node = next((i, n) for i, n in enumerate(nodes) if n.op_type == "SkipLayerNormalization")
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
    x, skip, gamma, beta = node.input[:4]
    p = node.name
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    axes = {"axes": [-1]} if opset < 18 else {}
    if opset >= 18:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axes"))
    mean_inputs = (lambda a: [a, f"{p}_axes"]) if opset >= 18 else (lambda a: [a])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(eps, np.float32), f"{p}_eps"))
    spelled = [helper.make_node("Add", [x, skip], [f"{p}_s"])]
    if len(node.input) > 4 and node.input[4]:
        spelled.append(helper.make_node("Add", [f"{p}_s", node.input[4]], [f"{p}_sb"]))
        s = f"{p}_sb"
    else:
        s = f"{p}_s"
    spelled += [
        helper.make_node("ReduceMean", mean_inputs(s), [f"{p}_m"], keepdims=1, **axes),
        helper.make_node("Sub", [s, f"{p}_m"], [f"{p}_c"]),
        helper.make_node("Mul", [f"{p}_c", f"{p}_c"], [f"{p}_sq"]),
        helper.make_node("ReduceMean", mean_inputs(f"{p}_sq"), [f"{p}_v"], keepdims=1, **axes),
        helper.make_node("Add", [f"{p}_v", f"{p}_eps"], [f"{p}_ve"]),
        helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"]),
        helper.make_node("Div", [f"{p}_c", f"{p}_sd"], [f"{p}_n"]),
        helper.make_node("Mul", [f"{p}_n", gamma], [f"{p}_g"]),
        helper.make_node("Add", [f"{p}_g", beta], [node.output[0]]),
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + spelled + nodes[i + 1:])
    return model


def test_losing_a_fused_operator_is_an_error_unless_allowed(built, tmp_path, monkeypatch):
    from fwsvd_deploy.errors import FusionLossError
    from fwsvd_deploy.exporters import optimize as optimize_module

    _, exported, _ = built("bert", "text-classification", "svd")
    real = optimize_module.restore
    monkeypatch.setattr(optimize_module, "restore", lambda fused, index, store=None: _unfuse_one_skip_layer_norm(
        real(fused, index, store)))
    with pytest.raises(FusionLossError, match="lost fused operators: 1 skip_layer_norm fewer"):
        optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    kept = optimize_onnx(exported.out_dir, OptimizeConfig(allow_fusion_loss=True), tmp_path / "o")
    assert kept.parity["passed"] and not kept.fusions_complete  # the same function, one fusion fewer
    manifest = json.loads((kept.out_dir / "manifest.json").read_text())
    assert manifest["fusions_complete"] is False and manifest["settings"]["allow_fusion_loss"] is True


def test_timed_sessions_do_not_spin(built):
    """Interleaved timing shares the cores between sessions: an idle session's threads must sleep, not spin."""
    path = built("bert", "text-classification", "baseline")[2].onnx_path
    key = "session.intra_op.allow_spinning"
    assert make_session(path, threads=1, spinning=False).get_session_options().get_session_config_entry(key) == "0"
    options = make_session(path, threads=1, spin_after_run=False).get_session_options()  # decode timing
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # spinning left on, ONNX Runtime's default
        options.get_session_config_entry(key)
