"""The GPU path on a CUDA machine: fp16 parity, I/O-bound latency, CUDA graphs, session device memory, TensorRT.

Run them with ``bash scripts/test.sh -m gpu``; without CUDA in ONNX Runtime they are skipped (conftest), saying why.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL, snr_db, tiny_encoder, toy_data
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.config import DataConfig, ExportConfig, GateConfig, OptimizeConfig, ValidateConfig
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.runtime import make_session, parity_inputs, run_session

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tokenizer):
    """A tiny BERT and a plain-SVD compression of it: exported, optimised for the CPU, for CUDA and for CUDA fp16."""
    root = tmp_path_factory.mktemp("gpu")
    model = tiny_encoder("bert", "text-classification")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    save_model(model, root / "base", tokenizer)
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    save_compressed(model, root / "svd", tokenizer)
    out = {"root": root}
    for name in ("base", "svd"):
        export_onnx(root / name, ExportConfig(), root / f"{name}-onnx")
        out[f"{name}-cpu"] = optimize_onnx(root / f"{name}-onnx", OptimizeConfig(), root / f"{name}-cpu").out_dir
        out[f"{name}-cuda"] = optimize_onnx(root / f"{name}-onnx", OptimizeConfig(device="cuda"),
                                            root / f"{name}-cuda").out_dir
        out[f"{name}-fp16"] = optimize_onnx(root / f"{name}-onnx", OptimizeConfig(device="cuda", fp16=True),
                                            root / f"{name}-fp16").out_dir
    d = toy_data(64, seed=5)
    import pandas as pd

    pd.DataFrame({"text": d.texts, "label": [d.label_names[y] for y in d.labels]}).to_csv(root / "eval.csv",
                                                                                         index=False)
    return out


@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_fp16_graph_matches_the_cpu_float32_graph(graphs, tokenizer, name):
    reference = make_session(graphs[f"{name}-cpu"] / "model.onnx", "cpu")
    fp16 = make_session(graphs[f"{name}-fp16"] / "model.onnx", "cuda")
    assert fp16.get_providers()[0] == "CUDAExecutionProvider"
    inputs = parity_inputs(tokenizer, [i.name for i in reference.get_inputs()], 4, 37)
    want, got = run_session(reference, inputs)["logits"], run_session(fp16, inputs)["logits"]
    assert snr_db(want, got) >= TOL["fp16_snr_db"]


def test_cuda_float32_graph_keeps_parity(graphs, tokenizer):
    reference = make_session(graphs["svd-cpu"] / "model.onnx", "cpu")
    cuda = make_session(graphs["svd-cuda"] / "model.onnx", "cuda")
    inputs = parity_inputs(tokenizer, [i.name for i in reference.get_inputs()], 3, 23)
    np.testing.assert_allclose(run_session(cuda, inputs)["logits"], run_session(reference, inputs)["logits"],
                               atol=TOL["onnx_vs_torch"], rtol=0)


def test_io_bound_latency_on_cuda(graphs):
    from fwsvd_deploy.validators.latency import _Runner, measure_latency

    result = measure_latency({"base": graphs["base-cuda"], "svd": graphs["svd-cuda"]}, device="cuda",
                             batch_sizes=(1, 8), seq_lens=(32,), threads=1, warmup=2, rounds=5, progress=False)
    assert [(c["batch"], c["sequence"]) for c in result["cells"]] == [(1, 32), (8, 32)]
    assert all(c["models"][n]["p50_ms"] > 0 for c in result["cells"] for n in ("base", "svd"))
    assert result["environment"]["gpu"].get("name")
    runner = _Runner(make_session(graphs["base-cuda"] / "model.onnx", "cuda"), _feed(graphs["base-cuda"], 2, 16),
                     "cuda")
    assert hasattr(runner, "binding")  # inputs live on the device; only the run is timed
    runner()


def _feed(folder, batch, seq):
    from fwsvd_deploy.validators.latency import synthetic_inputs, vocab_size

    session = make_session(folder / "model.onnx", "cpu")
    return synthetic_inputs(session, batch, seq, vocab=vocab_size(folder))


@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_graph_replays_what_the_session_computes(graphs, name):
    import onnxruntime as ort

    folder = graphs[f"{name}-cuda"]
    feed = _feed(folder, 2, 16)
    plain = make_session(folder / "model.onnx", "cuda")
    want = plain.run(None, feed)[0]
    graph = make_session(folder / "model.onnx", "cuda", cuda_graph=True)
    binding = graph.io_binding()
    inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feed.items()}
    for k, v in inputs.items():
        binding.bind_ortvalue_input(k, v)
    output = ort.OrtValue.ortvalue_from_shape_and_type(want.shape, np.float32, "cuda", 0)
    binding.bind_ortvalue_output(graph.get_outputs()[0].name, output)
    graph.run_with_iobinding(binding)  # captures
    graph.run_with_iobinding(binding)  # replays
    np.testing.assert_allclose(output.numpy(), want, atol=TOL["same_graph"], rtol=0)


def test_session_device_memory_is_the_sessions_own(graphs):
    from fwsvd_deploy.validators.memory import measure_memory

    measured = measure_memory(graphs["base-cuda"], "cuda", batch=2, seq=16, threads=1)
    device = measured["device"]
    assert device["available"], device
    assert 0 < device["used_mb"] < 4096 and device["method"]  # a tiny graph, not the whole GPU's use


def test_tensorrt_provider_runs_validation(graphs, tmp_path):
    import onnxruntime as ort

    from fwsvd_deploy.validators.validate import validate

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("ONNX Runtime here has CUDA but no TensorRT provider")
    data = DataConfig(dataset=str(graphs["root"] / "eval.csv"), max_length=32, eval_fraction=0.5)
    results = {}
    for device in ("cuda", "tensorrt"):
        cfg = ValidateConfig(device=device, batch_sizes=(1,), seq_lens=(16,), rounds=3, warmup=1, memory=False)
        results[device] = validate(graphs["base-cuda"], graphs["svd-cuda"], data, cfg,
                                   GateConfig(max_accuracy_drop=None), tmp_path / device).report
    # the same predictions through TensorRT as through CUDA, and a latency measured for each model
    assert results["tensorrt"]["accuracy"]["comparison"]["agreement"] == pytest.approx(
        results["cuda"]["accuracy"]["comparison"]["agreement"], abs=1 / 32)
    assert all(results["tensorrt"]["latency"]["cells"][0]["models"][n]["p50_ms"] > 0
               for n in ("baseline", "candidate"))
