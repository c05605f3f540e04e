"""The GPU path on a CUDA machine: fp16 parity, I/O-bound latency, CUDA graphs, session device memory, TensorRT;
decoders with the KV cache on CUDA and CUDA fp16, and causal-LM validation on CUDA.

Run them with ``bash scripts/test.sh -m gpu``; without CUDA in ONNX Runtime they are skipped (conftest), saying why.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import TOL, snr_db, tiny_decoder, tiny_encoder, toy_data
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.config import DataConfig, ExportConfig, GateConfig, OptimizeConfig, ValidateConfig
from fwsvd_deploy.errors import DeviceUnavailableError
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


def test_a_provider_that_cannot_start_is_refused_not_replaced(graphs):
    """ONNX Runtime lists TensorRT with its GPU build even without libnvinfer, and then runs the session on CUDA."""
    try:
        session = make_session(graphs["base-cuda"] / "model.onnx", "tensorrt")
    except DeviceUnavailableError as exc:
        assert "could not start" in str(exc) and "libnvinfer" in str(exc)
    else:
        assert session.get_providers()[0] == "TensorrtExecutionProvider"


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
    try:
        make_session(graphs["base-cuda"] / "model.onnx", "tensorrt")
    except DeviceUnavailableError as exc:  # the provider is listed, but its libraries are missing
        pytest.skip(str(exc))
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


# --- decoders: a tiny Llama with grouped-query attention and the KV cache ----------------------------------------


@pytest.fixture(scope="module")
def decoder_graphs(tmp_path_factory, tokenizer):
    """A tiny Llama (4 query, 2 key/value heads) and a plain-SVD compression of it: PyTorch folders, exported with
    the KV cache, optimised for the CPU, for CUDA and for CUDA fp16."""
    root = tmp_path_factory.mktemp("gpu-decoder")
    base = tiny_decoder("llama")
    candidate = copy.deepcopy(base)
    compress(candidate, CompressionConfig(method="svd", ratio=0.5))
    save_model(base, root / "base-pt", tokenizer)
    save_compressed(candidate, root / "svd-pt", tokenizer)
    out = {"root": root}
    for name in ("base", "svd"):
        out[f"{name}-pt"] = root / f"{name}-pt"
        exported = export_onnx(root / f"{name}-pt", ExportConfig(task="text-generation-with-past"),
                               root / f"{name}-onnx")
        for variant, cfg in (("cpu", OptimizeConfig()), ("cuda", OptimizeConfig(device="cuda")),
                             ("fp16", OptimizeConfig(device="cuda", fp16=True)),
                             ("int4-cpu", OptimizeConfig(quantize="int4")),
                             ("int4-cuda", OptimizeConfig(device="cuda", quantize="int4")),
                             ("int4-hqq-cpu", OptimizeConfig(quantize="int4", quantizer="hqq")),
                             ("int4-hqq-cuda", OptimizeConfig(device="cuda", quantize="int4", quantizer="hqq")),
                             # the CPU's default level 4 quantises activations, which CUDA's kernel does not
                             ("int8-weight-cpu", OptimizeConfig(quantize="int8-weight", accuracy_level=0)),
                             ("int8-weight-cuda", OptimizeConfig(device="cuda", quantize="int8-weight")),
                             ("packed-cuda", OptimizeConfig(device="cuda", pack_matmuls="all"))):
            out[f"{name}-{variant}"] = optimize_onnx(exported.out_dir, cfg, root / f"{name}-{variant}")
    text = root / "notes.txt"
    words = ("the", "film", "was", "great", "dull", "and", "moving", "overall", "a", "story")
    text.write_text("\n\n".join(" ".join(words[(i * 3 + j) % len(words)] for j in range(80)) for i in range(30)))
    out["text"] = text
    return out


def test_cuda_decoder_graphs_keep_every_fusion_of_the_baseline(decoder_graphs):
    for variant in ("cuda", "fp16"):
        base, svd = decoder_graphs[f"base-{variant}"], decoder_graphs[f"svd-{variant}"]
        assert svd.fusions == base.fusions and svd.reference_fusions == base.fusions and svd.fusions_complete
        assert svd.low_rank_layers == decoder_graphs["svd-cpu"].low_rank_layers > 0
        assert sum(base.fusions.values()) > 0


@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_decoder_matches_the_cpu_graph_with_the_cache(decoder_graphs, tokenizer, name):
    """Prefills of shapes the export never saw, three decode steps on the returned cache, 32 greedy tokens."""
    from fwsvd_deploy.exporters.decoder import OnnxDecoder, Tolerance, decoder_parity

    reference = OnnxDecoder(make_session(decoder_graphs[f"{name}-cpu"].onnx_path, "cpu"))
    cuda = make_session(decoder_graphs[f"{name}-cuda"].onnx_path, "cuda")
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    report = decoder_parity(OnnxDecoder(cuda), reference, tokenizer, OptimizeConfig().validate_shapes,
                            Tolerance(atol=TOL["optimised_graph"]), what="CUDA vs CPU")
    assert report["passed"] and report["greedy"]["identical"]


def _decode_logits(folder, device, batch=2, **kwargs):
    """Decode-step logits of a fixed unpadded generation (9 prompt tokens, 6 steps) through the timed loop."""
    from fwsvd_deploy.validators.decoder import DecoderGraph
    from fwsvd_deploy.validators.generation import Generation, generation_tokens

    session = make_session(folder / "model.onnx", device, cuda_graph=kwargs.get("cuda_graph", False))
    graph = DecoderGraph.from_session(session, folder)
    runner = Generation(session, graph, generation_tokens(graph.vocab, batch, 15), 9, device, **kwargs)
    runner.run()  # a first generation: the CUDA graph is captured on the first runs of its decode step
    return np.stack(runner.run(keep_logits=True)[2]).astype(np.float32)


@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_fp16_decoder_tracks_the_cpu_float32_graph(decoder_graphs, name):
    """The fp16 graph's attention is fused with lengths (CUDA's kernel): checked on unpadded rows, as generation
    feeds them, against the float32 CPU graph; its KV cache is float16 in and out."""
    fp16 = decoder_graphs[f"{name}-fp16"]
    assert fp16.attention.shares_cache and fp16.operators["Cast"] == 3
    want = _decode_logits(decoder_graphs[f"{name}-cpu"].out_dir, "cpu")
    got = _decode_logits(fp16.out_dir, "cuda")
    assert snr_db(want, got) >= TOL["fp16_snr_db"]
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.99


@pytest.mark.parametrize("name", ["base", "svd"])
def test_captured_decode_steps_replay_what_the_growing_cache_computes(decoder_graphs, name):
    """One shared max-length cache, the decode step captured once as a CUDA graph and replayed per token, the
    inputs refilled in place: the same logits as the uncaptured loop on a cache grown each step."""
    folder = decoder_graphs[f"{name}-fp16"].out_dir
    grown = _decode_logits(folder, "cuda")
    shared = _decode_logits(folder, "cuda", shared_cache=True)
    captured = _decode_logits(folder, "cuda", shared_cache=True, cuda_graph=True)
    assert snr_db(grown, shared) >= TOL["fp16_snr_db"] and snr_db(grown, captured) >= TOL["fp16_snr_db"]
    assert np.abs(shared - captured).max() <= 1e-3  # the same kernels, replayed


def test_generation_on_cuda_captures_where_both_graphs_allow_it(decoder_graphs):
    from fwsvd_deploy.errors import ConfigError
    from fwsvd_deploy.validators.generation import measure_generation

    def pair(variant):
        return {"baseline": decoder_graphs[f"base-{variant}"].out_dir,
                "candidate": decoder_graphs[f"svd-{variant}"].out_dir}

    timing = measure_generation(pair("fp16"), device="cuda", batch_sizes=(1, 4), prompt_len=8, new_tokens=6,
                                warmup=1, rounds=3, progress=False)
    assert timing["cuda_graph"] and timing["kv_cache"] == "one shared max-length buffer"
    assert all(c["models"][r]["decode"]["mean_ms"] > 0 for c in timing["cells"] for r in ("baseline", "candidate"))
    plain = measure_generation(pair("cuda"), device="cuda", batch_sizes=(1,), prompt_len=8, new_tokens=4, warmup=1,
                               rounds=2, progress=False)
    assert plain["cuda_graph"] is False and plain["kv_cache"] == "grown each step"
    with pytest.raises(ConfigError, match="shapes change under a captured graph"):
        measure_generation(pair("cuda"), device="cuda", batch_sizes=(1,), prompt_len=8, new_tokens=4,
                           cuda_graph=True, progress=False)


@pytest.mark.parametrize("scheme", ["int4", "int4-hqq", "int8-weight"])
@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_nbits_decoder_runs_matmulnbits_on_the_device_and_tracks_the_cpu_graph(decoder_graphs, tokenizer,
                                                                                     name, scheme):
    """The same 4-bit (round to nearest, HQQ's float zero points) or 8-bit weights through the CUDA and the CPU
    MatMulNBits kernels, factors included."""
    from fwsvd_deploy.exporters.decoder import OnnxDecoder, Tolerance, decoder_parity

    cuda_graph = decoder_graphs[f"{name}-{scheme}-cuda"]
    quantized = cuda_graph.quantization.quantized
    assert quantized > 0 and cuda_graph.operators["MatMulNBits"] == quantized
    reference = OnnxDecoder(make_session(decoder_graphs[f"{name}-{scheme}-cpu"].onnx_path, "cpu"))
    cuda = make_session(cuda_graph.onnx_path, "cuda")
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    report = decoder_parity(OnnxDecoder(cuda), reference, tokenizer, OptimizeConfig().validate_shapes,
                            Tolerance(min_sqnr_db=TOL["fp16_snr_db"], min_agreement=0.99),
                            what=f"CUDA vs CPU {scheme}")
    assert report["passed"]


@pytest.mark.parametrize("name", ["base", "svd"])
def test_cuda_joined_projections_compute_what_the_cpu_graph_does(decoder_graphs, tokenizer, name):
    """pack_matmuls on CUDA: fewer MatMuls, the values of the CPU float32 graph with the cache."""
    from fwsvd_deploy.exporters.decoder import OnnxDecoder, Tolerance, decoder_parity

    packed = decoder_graphs[f"{name}-packed-cuda"]
    assert packed.packed_matmuls > 0
    assert packed.operators["MatMul"] == decoder_graphs[f"{name}-cuda"].operators["MatMul"] - packed.packed_matmuls
    reference = OnnxDecoder(make_session(decoder_graphs[f"{name}-cpu"].onnx_path, "cpu"))
    report = decoder_parity(OnnxDecoder(make_session(packed.onnx_path, "cuda")), reference, tokenizer,
                            OptimizeConfig().validate_shapes, Tolerance(atol=TOL["optimised_graph"]),
                            what="CUDA joined vs CPU")
    assert report["passed"]


def test_causal_lm_validation_on_cuda(decoder_graphs, tmp_path):
    """Perplexity through ONNX Runtime on CUDA (and against PyTorch), generation timed with the cache on the device,
    the session's own device memory."""
    from fwsvd_deploy.validators.validate import validate

    data = DataConfig(dataset=str(decoder_graphs["text"]), eval_fraction=0.5, max_length=32, max_eval_samples=8)
    cfg = ValidateConfig(device="cuda", prompt_len=8, new_tokens=4, gen_batch_sizes=(1, 2), rounds=3, warmup=1,
                         memory_batch=2)
    graphs = {role: decoder_graphs[f"{name}-cuda"].out_dir for role, name in (("baseline", "base"),
                                                                              ("candidate", "svd"))}
    result = validate(graphs["baseline"], graphs["candidate"], data, cfg, GateConfig(max_accuracy_drop=None),
                      tmp_path / "r", pytorch_models={"baseline": decoder_graphs["base-pt"],
                                                      "candidate": decoder_graphs["svd-pt"]})
    report = result.report
    acc = report["accuracy"]
    for role in ("baseline", "candidate"):
        assert acc["pytorch"][role]["relative_diff"] <= 1e-4  # CUDA kernels against PyTorch on the CPU
    gen = report["generation"]
    assert gen["device"] == "cuda" and gen["environment"]["gpu"].get("name")
    assert all(c["models"][r]["decode"]["mean_ms"] > 0 for c in gen["cells"] for r in ("baseline", "candidate"))
    memory = report["memory"]
    for role in ("baseline", "candidate"):
        device = memory[role]["device"]
        assert device["available"] and 0 < device["used_mb"] < 4096, device
