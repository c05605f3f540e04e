"""ONNX export and low-rank-aware optimisation, on tiny models of every supported architecture and task."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import ENCODER_CONFIGS, TASK_CLASSES, export_and_optimise, tiny_encoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.compression.apply import resolve_targets
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
    assert exported.parity["passed"] and exported.parity["max_abs_diff"] <= ExportConfig().atol
    shapes = {(r["batch"], r["sequence"]) for r in exported.parity["shapes"]}
    assert (2, 16) not in shapes and len(shapes) == 2  # validated on shapes other than the export's
    assert optimized.parity["passed"] and optimized.parity["max_abs_diff"] <= OptimizeConfig().atol
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
    np.testing.assert_allclose(run_session(session, inputs)["logits"], want, atol=1e-4)


def test_optimised_folder_loads_in_optimum_and_pipeline(built, tokenizer):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import pipeline

    _, _, optimized = built("bert", "text-classification", "fwsvd")
    ort_model = ORTModelForSequenceClassification.from_pretrained(optimized.out_dir)
    session = make_session(optimized.onnx_path)
    inputs = parity_inputs(tokenizer, [i.name for i in session.get_inputs()], 3, 17)
    out = ort_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(out, run_session(session, inputs)["logits"], atol=1e-5)
    classify = pipeline("text-classification", model=ort_model, tokenizer=tokenizer)
    assert len(classify(["fine", "awful film"])) == 2


@pytest.mark.parametrize("variant", ["baseline", "fwsvd"])
def test_int8_runs_on_cpu_within_tolerance(built, tmp_path, variant):
    _, exported, _ = built("bert", "text-classification", variant)
    result = optimize_onnx(exported.out_dir, OptimizeConfig(int8=True), tmp_path / "int8")
    assert result.parity["passed"] and result.parity["max_abs_diff"] <= OptimizeConfig().int8_atol
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


def test_timed_sessions_do_not_spin(built):
    """Interleaved timing shares the cores between sessions: an idle session's threads must sleep, not spin."""
    path = built("bert", "text-classification", "baseline")[2].onnx_path
    key = "session.intra_op.allow_spinning"
    assert make_session(path, threads=1, spinning=False).get_session_options().get_session_config_entry(key) == "0"


def test_a_parity_check_that_compares_nothing_is_an_error(built, tokenizer):
    _, exported, _ = built("bert", "text-classification", "baseline")
    session = make_session(exported.onnx_path)
    with pytest.raises(ExportError, match="nothing was compared"):
        parity_report(session, tokenizer, lambda inputs, names: {}, ((1, 8),), 1e-4, what="test")
