"""Serving with onnxruntime-genai: the genai_config.json an optimised decoder folder carries, and what genai
generates from it (the very tokens and logits of our own loop on the same graph)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DECODER_FAMILIES, export_and_optimise, lm_decoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.errors import ConfigError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.decoder import PARITY_PROMPTS, OnnxDecoder, greedy
from fwsvd_deploy.exporters.genai import GENAI_FILE, genai_greedy
from fwsvd_deploy.exporters.runtime import make_session

og = pytest.importorskip("onnxruntime_genai", reason="the genai extra (onnxruntime-genai) is not installed")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, lm_tokenizer):
    """Each family's tiny decoder, factorised (plain SVD, keep 0.5), exported with its cache and optimised.

    Every weight is scaled by 4 (norms included), so greedy tokens change from step to step instead of repeating
    one token.
    """
    import functools

    root = tmp_path_factory.mktemp("genai")

    def build(family):
        model = lm_decoder(family, lm_tokenizer)
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(4.0)
        report = compress(model, CompressionConfig(method="svd", ratio=0.5))
        folder = root / family
        save_compressed(model, folder, lm_tokenizer, report=report)
        return export_and_optimise(folder, "text-generation-with-past")[2]

    return functools.cache(build)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_genai_generates_our_greedy_tokens_from_a_compressed_decoder(served, lm_tokenizer, family):
    optimized = served(family)
    assert optimized.low_rank_layers > 0 and optimized.genai_config == optimized.out_dir / GENAI_FILE
    manifest = json.loads((optimized.out_dir / "manifest.json").read_text())
    assert manifest["genai_config"] == GENAI_FILE
    ours = OnnxDecoder(make_session(optimized.onnx_path, "cpu"))
    for prompt in PARITY_PROMPTS:
        ids = np.array([lm_tokenizer(prompt)["input_ids"]], dtype=np.int64)
        tokens, logits = genai_greedy(optimized.out_dir, ids[0].tolist(), NEW_TOKENS)
        want, want_logits = greedy(ours, ids, np.ones_like(ids), NEW_TOKENS, keep_logits=True)
        assert tokens == want[0].tolist(), (family, prompt)
        assert len(set(tokens)) > 3  # the comparison is not one repeated token
        np.testing.assert_allclose(logits, want_logits[0], atol=1e-4, rtol=0)


def test_genai_config_follows_the_graph(served):
    llama = json.loads((served("llama").out_dir / GENAI_FILE).read_text())
    decoder = llama["model"]["decoder"]
    assert llama["model"]["type"] == "llama" and decoder["num_hidden_layers"] == 2
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (4, 2, 16)
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert llama["search"]["past_present_share_buffer"] is False and llama["search"]["do_sample"] is False
    for family in ("gpt2", "opt"):  # no genai type of their own: genai's generic decoder
        optimized = served(family)
        config = json.loads((optimized.out_dir / GENAI_FILE).read_text())
        takes = {i.name for i in make_session(optimized.onnx_path, "cpu").get_inputs()}
        assert config["model"]["type"] == "decoder"
        assert ("position_ids" in config["model"]["decoder"]["inputs"]) == ("position_ids" in takes)


def test_genai_is_optional_and_refused_where_it_cannot_serve(tmp_path, tiny_bert_dir, served, lm_tokenizer,
                                                             capsys):
    src = served("llama").out_dir.parent / "llama-onnx"
    off = optimize_onnx(src, OptimizeConfig(genai=False), tmp_path / "off")
    assert off.genai_config is None and not (off.out_dir / GENAI_FILE).exists()
    # an encoder: exit 2 before any work, nothing written
    encoder = export_onnx(tiny_bert_dir, ExportConfig(), tmp_path / "bert-onnx").out_dir
    assert main(["optimize", "--onnx", str(encoder), "--out", str(tmp_path / "bert-opt"), "--genai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime-genai serves causal LMs only" in err[0]
    assert not (tmp_path / "bert-opt").exists()
    # a decoder exported without its cache
    folder = tmp_path / "nocache"
    save_model(lm_decoder("llama", lm_tokenizer), folder, lm_tokenizer)
    plain = export_onnx(folder, ExportConfig(task="text-generation"), tmp_path / "nocache-onnx").out_dir
    with pytest.raises(ConfigError, match="without its KV cache"):
        optimize_onnx(plain, OptimizeConfig(genai=True), tmp_path / "nocache-opt")
    assert not (tmp_path / "nocache-opt").exists()
    assert optimize_onnx(plain, OptimizeConfig(), tmp_path / "nocache-default").genai_config is None
    with pytest.raises(ConfigError, match="genai="):
        OptimizeConfig(genai="yes")
