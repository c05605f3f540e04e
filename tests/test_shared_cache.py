"""The decode path of CUDA graphs, checked on the CPU: attention fused with lengths instead of a padding bias, one
max-length KV cache that past and present share, a mask as wide as that cache, and the refusals of ``--cuda-graph``.

The capture and replay themselves need a GPU (``tests/test_gpu.py``); everything they rest on runs here: the CPU
``GroupQueryAttention`` kernel shares a buffer the same way (past and present bound to one tensor).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import lm_decoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import ExportConfig, OptimizeConfig, ValidateConfig
from fwsvd_deploy.errors import ConfigError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.attention import AttentionFusion, attention_blocker, fuse_decoder_attention
from fwsvd_deploy.exporters.runtime import make_session
from fwsvd_deploy.validators.decoder import DecoderGraph
from fwsvd_deploy.validators.generation import Generation, cache_sharing, generation_tokens, use_cuda_graph

TASK = "text-generation-with-past"
PROMPT, TOTAL = 9, 15


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, lm_tokenizer):
    """A tiny Llama compressed with plain SVD: its graph optimised with the exported attention, fused as for the CPU
    (padding bias), and fused with lengths (the CUDA form) into a folder of its own."""
    root = tmp_path_factory.mktemp("shared-cache")
    model = lm_decoder("llama", lm_tokenizer)
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    save_compressed(model, root / "pt", lm_tokenizer)
    exported = export_onnx(root / "pt", ExportConfig(task=TASK), root / "onnx")
    unfused = optimize_onnx(exported.out_dir, OptimizeConfig(fuse_attention=False), root / "unfused")
    biased = optimize_onnx(exported.out_dir, OptimizeConfig(), root / "bias")
    shutil.copytree(unfused.out_dir, root / "lengths")
    fused, fusion = fuse_decoder_attention(onnx.load(str(unfused.onnx_path)), num_heads=4, num_kv_heads=2,
                                           padding="lengths")
    onnx.save(fused, str(root / "lengths" / "model.onnx"))
    manifest = json.loads((root / "lengths" / "manifest.json").read_text())
    manifest["attention_fusion"] = fusion.to_dict()
    (root / "lengths" / "manifest.json").write_text(json.dumps(manifest))
    return {"unfused": unfused.out_dir, "bias": biased.out_dir, "lengths": root / "lengths", "fusion": fusion,
            "bias_fusion": biased.attention}


def _decode_logits(folder, batch, **kwargs):
    session = make_session(folder / "model.onnx")
    graph = DecoderGraph.from_session(session, folder)
    tokens = generation_tokens(graph.vocab, batch, TOTAL)
    _, decode_ms, logits = Generation(session, graph, tokens, PROMPT, "cpu", **kwargs).run(keep_logits=True)
    assert len(decode_ms) == len(logits) == TOTAL - PROMPT
    return np.stack(logits)


def test_lengths_fusion_has_no_bias_and_says_it_can_share_the_cache(graphs):
    fusion, bias = graphs["fusion"], graphs["bias_fusion"]
    assert fusion == AttentionFusion(2, 2, None, "lengths") and fusion.shares_cache
    assert bias.padding == "bias" and not bias.shares_cache
    model = onnx.load(str(graphs["lengths"] / "model.onnx"))
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) == 7 for n in gqa)  # q, k, v, past k/v, seqlens_k, total: no bias
    assert "Where" not in {n.op_type for n in model.graph.node}  # the bias construction is gone
    with pytest.raises(ValueError, match="padding"):
        fuse_decoder_attention(model, num_heads=4, num_kv_heads=2, padding="left")


@pytest.mark.parametrize("batch", [1, 3])
def test_the_shared_cache_decodes_what_the_growing_cache_does(graphs, batch):
    """Past and present bound to one (batch, kv_heads, prompt + new, head_dim) buffer, the mask as wide as it:
    the same logits as the exported attention on a cache grown each step."""
    want = _decode_logits(graphs["unfused"], batch)
    grown = _decode_logits(graphs["lengths"], batch)
    shared = _decode_logits(graphs["lengths"], batch, shared_cache=True)
    assert np.abs(grown - want).max() < 1e-4
    assert np.abs(shared - want).max() < 1e-4
    assert np.abs(want).max() > 1e-2  # the logits are not all zero


def test_a_generation_reuses_its_shared_cache_round_after_round(graphs):
    """The buffer is allocated once: a second generation on it overwrites the first's keys and values."""
    folder = graphs["lengths"]
    session = make_session(folder / "model.onnx")
    graph = DecoderGraph.from_session(session, folder)
    runner = Generation(session, graph, generation_tokens(graph.vocab, 2, TOTAL), PROMPT, "cpu", shared_cache=True)
    addresses = {name: value.data_ptr() for name, value in runner.cache.items()}
    first = runner.run(keep_logits=True)[2]
    cache = {name: value.numpy().copy() for name, value in runner.cache.items()}
    second = runner.run(keep_logits=True)[2]
    assert {name: value.data_ptr() for name, value in runner.cache.items()} == addresses
    assert all(np.abs(v[:, :, :TOTAL - 1]).max() > 0 for v in cache.values())  # written in place, every position
    assert all(np.array_equal(v, runner.cache[name].numpy()) for name, v in cache.items())
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="shared cache"):
        Generation(session, graph, generation_tokens(graph.vocab, 1, TOTAL), PROMPT, "cpu", cuda_graph=True)


def test_which_graphs_can_share_their_cache(graphs):
    assert cache_sharing(graphs["lengths"]) is None
    assert "bias" in cache_sharing(graphs["bias"])
    assert "not fused" in cache_sharing(graphs["unfused"])
    assert "manifest" in cache_sharing(graphs["lengths"].parent / "pt")


def test_cuda_graph_choice_and_refusals(graphs):
    pair = {"baseline": graphs["lengths"], "candidate": graphs["bias"]}
    assert use_cuda_graph(pair, "cpu", None) is False
    assert use_cuda_graph({"baseline": graphs["lengths"]}, "cuda", None) is True
    assert use_cuda_graph(pair, "cuda", None) is False  # one graph cannot: both run without
    assert use_cuda_graph(pair, "cuda", False) is False
    with pytest.raises(ConfigError, match="--device cuda"):
        use_cuda_graph(pair, "cpu", True)
    with pytest.raises(ConfigError, match=r"candidate .*bias.*shapes change under a captured graph"):
        use_cuda_graph(pair, "cuda", True)
    with pytest.raises(ConfigError, match="device cuda"):
        ValidateConfig(cuda_graph=True)
    with pytest.raises(ConfigError, match="true, false or null"):
        ValidateConfig(device="cuda", cuda_graph="yes")
    assert ValidateConfig(device="cuda", cuda_graph=True).to_dict()["cuda_graph"] is True


@pytest.mark.parametrize("command", ["bench", "validate"])
def test_cuda_graph_on_the_cpu_is_bad_usage(graphs, command, tmp_path, capsys):
    out = tmp_path / "out"
    args = ([command, "--model", str(graphs["bias"]), "--model", str(graphs["lengths"])] if command == "bench" else
            [command, "--baseline", str(graphs["bias"]), "--candidate", str(graphs["lengths"]), "--dataset",
             "speeches"])
    assert main([*args, "--cuda-graph", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph" in err[0] and "cuda" in err[0]
    assert not out.exists()


def test_cuda_fusion_is_for_float16_graphs():
    from conftest import LM_DECODER_CONFIGS

    config = LM_DECODER_CONFIGS["llama"]()
    assert attention_blocker(config, "cuda", fp16=True) is None
    assert "float16 only" in attention_blocker(config, "cuda")
    assert "CPU and CUDA only" in attention_blocker(config, "tensorrt", fp16=True)


def test_a_graph_fused_for_cuda_is_written_on_the_cpu_and_can_share_its_cache(tmp_path, lm_tokenizer):
    """The CUDA fp16 optimisation, written on a machine without a GPU: every block fused with lengths, recorded
    in the manifest (its parity is checked on a CUDA machine, tests/test_gpu.py)."""
    model = lm_decoder("qwen2", lm_tokenizer)
    save_model(model, tmp_path / "pt", lm_tokenizer)
    exported = export_onnx(tmp_path / "pt", ExportConfig(task=TASK), tmp_path / "onnx")
    result = optimize_onnx(exported.out_dir, OptimizeConfig(device="cuda", fp16=True), tmp_path / "fp16")
    assert result.attention == AttentionFusion(2, 2, None, "lengths")
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["attention_fusion"]["shares_cache"] and cache_sharing(result.out_dir) is None
    assert result.operators["GroupQueryAttention"] == 2
