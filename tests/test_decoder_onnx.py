"""Decoder language models: ONNX export with the KV cache, low-rank-aware optimisation, parity, bad inputs."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import DECODER_FAMILIES, LM_DECODER_CONFIGS, LM_VOCAB, export_and_optimise, lm_model_folder
from fwsvd_deploy import save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.errors import ConfigError, DeviceUnavailableError, ExportError, ParityError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.attention import AttentionFusion, attention_blocker, fuse_decoder_attention
from fwsvd_deploy.exporters.decoder import (
    DECODE_STEPS,
    GREEDY_TOKENS,
    CacheLayout,
    OnnxDecoder,
    Tolerance,
    TorchDecoder,
    decoder_parity,
    positions_of,
    prefill_rows,
    prompt_rows,
)
from fwsvd_deploy.exporters.optimize import fused_operator_counts
from fwsvd_deploy.exporters.runtime import make_session
from fwsvd_deploy.families import FAMILIES

TASK = "text-generation-with-past"
VARIANTS = ("baseline", "svd")
# Factorised linears per block: q, k, v, o + gate, up, down; GPT-2's c_attn, c_proj, c_fc, mlp c_proj; OPT's q, k, v,
# out_proj, fc1, fc2.
BLOCK_LINEARS = {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4, "opt": 6}


def _layers(family: str) -> int:
    config = LM_DECODER_CONFIGS[family]()
    return config.num_hidden_layers


def expected_fusions(family: str) -> dict[str, int]:
    """What ONNX Runtime fuses in the tiny dense export of each family (kinds from the families table)."""
    n = _layers(family)
    counts = {
        "gpt2": {"layer_norm": 1, "skip_layer_norm": 2 * n, "gelu": n},
        "opt": {"layer_norm": 2 * n + 1},
    }.get(family, {"simplified_layer_norm": 1, "skip_simplified_layer_norm": 2 * n, "rotary_embedding": 2 * n,
                   "attention": n})
    assert set(counts) == set(FAMILIES[family].fusions) | ({"attention"} if FAMILIES[family].fuse_attention else set())
    return counts


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, lm_tokenizer):
    """Lazily build, export and optimise each (family, variant) once per module."""
    root = tmp_path_factory.mktemp("decoders")
    return functools.cache(lambda family, variant: export_and_optimise(
        lm_model_folder(root, lm_tokenizer, family, variant), TASK))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_export_and_optimise_keep_parity_with_the_cache(decoders, family, variant):
    folder, exported, optimized = decoders(family, variant)
    config = LM_DECODER_CONFIGS[family]()
    for result, atol in ((exported, ExportConfig().atol), (optimized, OptimizeConfig().atol)):
        parity = result.parity
        assert parity["passed"] and parity["max_abs_diff"] <= atol
        assert {(r["batch"], r["sequence"]) for r in parity["shapes"]} == {(3, 23), (1, 41)}  # not the export's 2 x 16
        assert all(len(r["decode_logits"]) == DECODE_STEPS and "prefill_cache" in r for r in parity["shapes"])
        assert parity["greedy"]["identical"] and np.array(parity["greedy"]["tokens"]).shape == (3, GREEDY_TOKENS)
        assert parity["compared_outputs"] == 2 * (1 + 2 * _layers(family) + DECODE_STEPS)  # logits and cache
    layout = exported.kv_cache
    kv_heads = getattr(config, "num_key_value_heads", 4)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (_layers(family), kv_heads, 16)
    assert layout.bytes_per_token == 2 * _layers(family) * kv_heads * 16 * 4
    assert optimized.low_rank_layers == (0 if variant == "baseline" else BLOCK_LINEARS[family] * _layers(family))
    manifest = json.loads((optimized.out_dir / "manifest.json").read_text())
    assert manifest["fusions"] == optimized.fusions and CacheLayout.from_dict(manifest["kv_cache"]) == layout
    assert manifest["fused_operators"] == fused_operator_counts(onnx.load(str(optimized.onnx_path)))
    assert manifest["settings"]["ort_model_type"] == FAMILIES[family].ort_model_type
    session = make_session(optimized.onnx_path)
    axes = {i.name: i.shape for i in session.get_inputs()}
    assert axes["input_ids"] == ["batch_size", "sequence_length"]
    assert axes["past_key_values.0.key"] == ["batch_size", kv_heads, "past_sequence_length", 16]


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_compressed_decoder_keeps_every_fusion_of_the_baseline(decoders, family):
    base = decoders(family, "baseline")[2]
    comp = decoders(family, "svd")[2]
    assert {k: v for k, v in base.fusions.items() if v} == expected_fusions(family)
    assert comp.fusions == base.fusions and comp.reference_fusions == base.fusions and comp.fusions_complete


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_only_the_passes_a_family_needs_run_and_nothing_is_lost(decoders, family):
    """The family's trimmed pass list fuses exactly what every pass of ONNX Runtime fuses on the same graph; the
    attention ONNX Runtime leaves is fused afterwards, for the rotary families."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _, exported, optimized = decoders(family, "baseline")
    config = LM_DECODER_CONFIGS[family]()
    ort_type = FAMILIES[family].ort_model_type
    full = optimize_model(str(exported.onnx_path), model_type=ort_type, num_heads=config.num_attention_heads,
                          hidden_size=config.hidden_size, optimization_options=FusionOptions(ort_type), opt_level=0)
    ours = fused_operator_counts(onnx.load(str(optimized.onnx_path)))
    assert ours.pop("GroupQueryAttention", 0) == (_layers(family) if FAMILIES[family].fuse_attention else 0)
    assert fused_operator_counts(full.model) == ours


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", [f for f in DECODER_FAMILIES if FAMILIES[f].fuse_attention])
def test_rotary_attention_becomes_one_group_query_attention_per_layer(decoders, family, variant):
    """Every block fused (4 query, 2 key/value heads), the rotary embeddings moved onto the 3-D projections, the
    exported attention and the model's own mask construction gone; parity is asserted above on left-padded rows."""
    _, exported, optimized = decoders(family, variant)
    n = _layers(family)
    assert optimized.attention == AttentionFusion(n, n, None, "bias")
    manifest = json.loads((optimized.out_dir / "manifest.json").read_text())
    assert manifest["attention_fusion"] == {"fused": n, "blocks": n, "note": None, "padding": "bias",
                                           "shares_cache": False}
    graph = onnx.load(str(optimized.onnx_path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("GroupQueryAttention") == n and "Softmax" not in ops and "IsNaN" not in ops
    producers = {o: node for node in graph.node for o in node.output}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (4, 2, 0)
            assert attrs["scale"] == pytest.approx(16 ** -0.5)
            assert [producers[node.input[i]].op_type for i in (0, 1)] == ["RotaryEmbedding"] * 2
            assert node.output[1].startswith("present.") and node.input[3].startswith("past_key_values.")
        if node.op_type == "RotaryEmbedding":
            assert producers[node.input[0]].op_type in ("MatMul", "Add")  # the projection itself, 3-D
    exported_nodes = len(onnx.load(str(exported.onnx_path)).graph.node)
    assert len(graph.node) < exported_nodes / 4


def test_attention_fusion_leaves_what_it_does_not_know(decoders):
    """GPT-2's attention is not the rotary form: nothing changes, and the reason is given."""
    model = onnx.load(str(decoders("gpt2", "baseline")[2].onnx_path))
    same, result = fuse_decoder_attention(model, num_heads=4, num_kv_heads=4)
    assert same is model and result.fused == 0 and result.blocks == 2 and "rotary" in result.note
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "attention_mask"))
    assert "attention_mask" in fuse_decoder_attention(model, num_heads=4, num_kv_heads=4)[1].note


def test_attention_with_another_additive_term_is_left_alone(decoders, tmp_path, lm_tokenizer):
    """A block whose scores get more than the mask (here a constant added to layer 0's) is not fused; the other block
    is, and the partly fused graph agrees with the exported attention. ``--no-fuse-attention`` leaves both."""
    _, exported, _ = decoders("llama", "baseline")
    unfused = optimize_onnx(exported.out_dir, OptimizeConfig(fuse_attention=False), tmp_path / "unfused")
    assert unfused.attention == AttentionFusion(0, 2, "fuse_attention is off") and unfused.parity["passed"]
    model = onnx.load(str(unfused.onnx_path))
    assert unfused.fusions["attention"] == 0 and sum(n.op_type == "Softmax" for n in model.graph.node) == 2
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax" and "layers.0/" in n.name)
    add = next(n for n in model.graph.node if softmax.input[0] in n.output)
    mask = next(i for i in add.input if "MatMul" not in i)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "position_bias"))
    model.graph.node.append(onnx.helper.make_node("Add", [mask, "position_bias"], ["biased_mask"]))
    add.input[list(add.input).index(mask)] = "biased_mask"
    fused, result = fuse_decoder_attention(model, num_heads=4, num_kv_heads=2)
    assert (result.fused, result.blocks) == (1, 2)
    assert [n.op_type for n in fused.graph.node].count("Softmax") == 1
    onnx.save(fused, str(tmp_path / "partly.onnx"))
    report = decoder_parity(OnnxDecoder(make_session(tmp_path / "partly.onnx")), OnnxDecoder(make_session(
        unfused.onnx_path)), lm_tokenizer, ((3, 23),), Tolerance(atol=1e-4), what="partly fused vs exported")
    assert report["passed"] and report["greedy"]["identical"]


def test_fused_attention_takes_a_chunk_on_top_of_the_cache_at_batch_1(decoders, tmp_path, lm_tokenizer):
    """Several new tokens on top of a cache: the operator's causal mask is offset by the past; at batch 1 (what
    ONNX Runtime's GroupQueryAttention takes) the fused graph agrees with the exported attention."""
    _, exported, fused = decoders("llama", "svd")
    unfused = optimize_onnx(exported.out_dir, OptimizeConfig(fuse_attention=False), tmp_path / "unfused")
    ids, mask = prefill_rows(lm_tokenizer, 1, 12)
    positions = positions_of(mask)
    results = []
    for path in (fused.onnx_path, unfused.onnx_path):
        decoder = OnnxDecoder(make_session(path))
        _, state = decoder.start(ids[:, :7], mask[:, :7], positions[:, :7])
        logits, state = decoder.advance(state, ids[:, 7:], mask, positions[:, 7:])
        results.append((logits, state))
    (got, got_cache), (want, want_cache) = results
    assert got.shape == (1, 5, LM_VOCAB) and np.abs(got - want).max() < 1e-4
    assert max(np.abs(g - w).max() for g, w in zip(got_cache, want_cache, strict=True)) < 1e-4


def test_attention_fusion_blockers(tmp_path, lm_tokenizer):
    """Float32 CUDA graphs and binding sliding windows keep the exported attention, saying why; parity holds. A window
    of 8 is shorter than the parity prefills: PyTorch's sliding-window cache keeps the last positions only, and the
    export compares those."""
    from transformers import AutoModelForCausalLM, MistralConfig

    assert attention_blocker(LM_DECODER_CONFIGS["llama"](), "cpu") is None
    assert "float16 only" in attention_blocker(LM_DECODER_CONFIGS["llama"](), "cuda")
    assert attention_blocker(LM_DECODER_CONFIGS["mistral"](), "cpu") is None  # window 4096 > 128 positions
    config = MistralConfig(**{**LM_DECODER_CONFIGS["mistral"]().to_dict(), "sliding_window": 8})
    config.bos_token_id, config.eos_token_id = lm_tokenizer.bos_token_id, lm_tokenizer.eos_token_id
    assert "sliding-window" in attention_blocker(config, "cpu")
    torch.manual_seed(0)
    folder = tmp_path / "windowed"
    save_model(AutoModelForCausalLM.from_config(config).eval(), folder, lm_tokenizer)
    exported = export_onnx(folder, ExportConfig(task=TASK), tmp_path / "onnx")
    assert exported.parity["passed"] and exported.parity["greedy"]["identical"]
    optimized = optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "opt")
    assert optimized.parity["passed"] and optimized.fusions["attention"] == 0
    assert optimized.attention.fused == 0 and "window 8" in optimized.attention.note
    manifest = json.loads((optimized.out_dir / "manifest.json").read_text())
    assert "window 8" in manifest["attention_fusion"]["note"]


def test_grouped_query_attention_factors_keep_their_own_shapes(decoders):
    """k/v under GQA are 64 -> 32: their factors are (64 x r) and (r x 32), not square."""
    from fwsvd_deploy import load_compressed

    folder, _, optimized = decoders("llama", "svd")
    k_proj = load_compressed(folder).model.layers[0].self_attn.k_proj
    assert (k_proj.in_features, k_proj.out_features) == (64, 32)
    shapes = {tuple(i.dims) for i in onnx.load(str(optimized.onnx_path)).graph.initializer}
    assert (64, k_proj.rank) in shapes and (k_proj.rank, 32) in shapes


@pytest.mark.parametrize(("family", "variant", "stage"), [("llama", "svd", 2), ("gpt2", "baseline", 1),
                                                           ("opt", "svd", 2)])
def test_ort_model_for_causal_lm_generates_what_pytorch_generates(decoders, lm_tokenizer, family, variant, stage):
    from optimum.onnxruntime import ORTModelForCausalLM

    from fwsvd_deploy.modeling import load_causal_lm

    folders = decoders(family, variant)
    ort_model = ORTModelForCausalLM.from_pretrained(folders[stage].out_dir)
    model = load_causal_lm(str(folders[0]))
    ids, mask = prompt_rows(lm_tokenizer)  # the tokenizer has no pad token: left-padded by hand
    prompts = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    settings = {"max_new_tokens": GREEDY_TOKENS, "min_new_tokens": GREEDY_TOKENS, "do_sample": False}
    with torch.no_grad():
        want = model.generate(**prompts, **settings)
    assert torch.equal(ort_model.generate(**prompts, **settings), want)


def test_text_generation_without_cache(tmp_path, lm_tokenizer):
    folder = lm_model_folder(tmp_path, lm_tokenizer, "qwen2", "svd")
    exported = export_onnx(folder, ExportConfig(task="text-generation"), tmp_path / "onnx")
    assert exported.kv_cache is None and exported.parity["greedy"]["identical"]
    assert "prefill_cache" not in exported.parity["shapes"][0]
    optimized = optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "opt")
    assert optimized.parity["passed"] and optimized.fusions_complete and optimized.low_rank_layers == 14
    assert optimized.attention == AttentionFusion(2, 2, None, "bias")  # no cache: no past, fresh present outputs


def test_external_data(tmp_path, lm_tokenizer):
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = lm_model_folder(tmp_path, lm_tokenizer, "mistral", "svd")
    exported = export_onnx(folder, ExportConfig(task=TASK, external_data=True), tmp_path / "onnx")
    assert (exported.out_dir / "model.onnx_data").is_file() and exported.parity["passed"]
    assert (exported.out_dir / "model.onnx").stat().st_size < 1 << 20
    ORTModelForCausalLM.from_pretrained(exported.out_dir)
    assert optimize_onnx(exported.out_dir, OptimizeConfig(), tmp_path / "opt").parity["passed"]


@pytest.mark.parametrize(("family", "variant"), [("llama", "svd"), ("gpt2", "baseline")])
def test_int8_on_the_low_rank_graph_within_its_floors(decoders, tmp_path, family, variant):
    _, exported, fp32 = decoders(family, variant)
    result = optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int8"), tmp_path / "int8")
    cfg = OptimizeConfig()
    for row in result.parity["shapes"]:
        assert row["sqnr_db"] >= cfg.int8_min_sqnr_db and row["agreement"] >= cfg.int8_min_agreement
    assert result.parity["tolerance"]["atol"] is None and result.parity["passed"]
    ops = result.operators
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0
    assert result.fusions == fp32.fusions and result.low_rank_layers == fp32.low_rank_layers


def test_fp16_cuda_graph_is_written_and_refuses_to_run_without_cuda(decoders, tmp_path):
    import onnxruntime as ort

    _, exported, fp32 = decoders("llama", "svd")
    result = optimize_onnx(exported.out_dir, OptimizeConfig(device="cuda", fp16=True), tmp_path / "fp16")
    model = onnx.load(str(result.onnx_path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    kinds = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    cache = [name for name in kinds if name.startswith(("past_key_values.", "present."))]
    assert len(cache) == 8 and all(kinds[name] == onnx.TensorProto.FLOAT16 for name in cache)  # no Cast on the cache
    assert kinds["logits"] == onnx.TensorProto.FLOAT
    # Casts only at the edge: the logits' and the two int ones of the attention's lengths, none inside a block
    producers = {o: n for n in model.graph.node for o in n.output}
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert result.operators["Cast"] == len(casts) == 3
    assert {n.output[0] for n in casts if n.output[0] in kinds} == {"logits"}
    assert all(producers[n.input[0]].op_type in ("Gather", "ReduceSum") for n in casts if n.output[0] != "logits")
    assert result.parity is None and result.fusions == fp32.fusions  # attention fused for CUDA too
    assert result.attention == AttentionFusion(2, 2, None, "lengths") and result.attention.shares_cache
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["kv_cache"]["dtype_bytes"] == 2
    assert manifest["kv_cache"]["bytes_per_token"] == exported.kv_cache.bytes_per_token // 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            make_session(result.onnx_path, "cuda")


def test_parity_fails_on_a_changed_weight(decoders, lm_tokenizer):
    """A model whose final norm differs by 1% from its graph's is caught by its logits: an error, not a warning."""
    from fwsvd_deploy.modeling import load_causal_lm

    folder, exported, _ = decoders("llama", "svd")
    graph = OnnxDecoder(make_session(exported.onnx_path))
    model = load_causal_lm(str(folder))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.01)
    with pytest.raises(ParityError, match="ONNX vs PyTorch parity failed: prefill logits at batch 3 x sequence 23"):
        decoder_parity(graph, TorchDecoder(model, positions=graph.takes_positions), lm_tokenizer, ((3, 23),),
                       Tolerance(atol=ExportConfig().atol), what="ONNX vs PyTorch")


class _Constant:
    """A decoder whose every next-token distribution prefers ``token``."""

    def __init__(self, token: int, vocab: int = 8) -> None:
        self.logits = np.zeros(vocab, np.float32)
        self.logits[token] = 1.0

    def _out(self, ids):
        return np.broadcast_to(self.logits, (*ids.shape, self.logits.size)).copy(), None

    def start(self, ids, mask, positions):
        return self._out(ids)

    def advance(self, state, ids, mask, positions):
        return self._out(ids)

    def cache(self, state):
        return None


def test_parity_gates_greedy_tokens_and_refuses_to_compare_nothing(lm_tokenizer):
    loose = Tolerance(atol=10.0)  # logits within tolerance, but the greedy choice differs
    with pytest.raises(ParityError, match="greedy generation from prompt 1 differs at new token 1 of 32"):
        decoder_parity(_Constant(3), _Constant(5), lm_tokenizer, ((2, 9),), loose, what="test")
    assert decoder_parity(_Constant(3), _Constant(3), lm_tokenizer, ((2, 9),), loose, what="test")["passed"]
    with pytest.raises(ExportError, match="no outputs were compared"):
        decoder_parity(_Constant(3), _Constant(3), lm_tokenizer, (), loose, what="test")
    lossy = Tolerance(min_sqnr_db=20.0, min_agreement=0.9)  # int8: floors, greedy reported only
    with pytest.raises(ParityError, match="signal-to-noise"):
        decoder_parity(_Constant(3), _Constant(5), lm_tokenizer, ((2, 9),), lossy, what="test")
    with pytest.raises(ConfigError, match="either atol"):
        Tolerance(atol=1e-3, min_sqnr_db=20.0, min_agreement=0.9)


def test_bad_inputs_fail_early_and_write_nothing(decoders, tmp_path, tiny_bert_dir, lm_tokenizer, capsys):
    folder, exported, _ = decoders("gpt2", "baseline")
    with pytest.raises(ConfigError, match=r"causal language model \(GPT2LMHeadModel\); export it with --task "
                                          "text-generation-with-past"):
        export_onnx(folder, ExportConfig(task="text-classification"), tmp_path / "a")
    with pytest.raises(ConfigError, match="not a causal language model; task 'text-generation-with-past' needs"):
        export_onnx(tiny_bert_dir, ExportConfig(task=TASK), tmp_path / "b")
    with pytest.raises(ConfigError, match="allows 128 positions, but the decoder parity check runs 133"):
        export_onnx(folder, ExportConfig(task=TASK, validate_shapes=((1, 130),)), tmp_path / "c")
    with pytest.raises(ConfigError, match="allows 128 positions"):
        optimize_onnx(exported.out_dir, OptimizeConfig(validate_shapes=((1, 130),)), tmp_path / "d")
    assert main(["export", "--model", str(folder), "--task", "text-classification", "--out", str(tmp_path / "e")]) == 2
    assert "causal language model" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_an_architecture_without_known_fusions_exports_but_is_not_optimised(tmp_path, lm_tokenizer, capsys):
    """Phi-3 exports (with parity); the optimiser names the families it supports and writes nothing."""
    from transformers import Phi3Config, Phi3ForCausalLM


    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=LM_VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, pad_token_id=lm_tokenizer.pad_token_id)).eval()
    save_model(model, tmp_path / "phi3", lm_tokenizer)
    assert export_onnx(tmp_path / "phi3", ExportConfig(task=TASK), tmp_path / "onnx").parity["passed"]
    code = main(["optimize", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "opt")])
    err = capsys.readouterr().err
    assert code == 2 and "model type 'phi3' cannot be optimised" in err and "gpt2, llama, mistral, opt, qwen2" in err
    assert "compression and export work" in err and not (tmp_path / "opt").exists()


def test_cli_exports_and_optimises_a_decoder(decoders, tmp_path, capsys):
    folder = decoders("qwen2", "svd")[0]
    assert main(["export", "--model", str(folder), "--task", TASK, "--out", str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert "exported compressed model for text-generation-with-past" in out and "greedy 32 tokens identical" in out
    assert main(["optimize", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "opt")]) == 0
    out = capsys.readouterr().out
    assert "rotary_embedding 4" in out and "all kept" in out and "greedy 32 tokens identical" in out
    assert "attention 2" in out
    assert main(["optimize", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "plain"),
                 "--no-fuse-attention"]) == 0
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert manifest["attention_fusion"]["note"] == "fuse_attention is off" and manifest["fusions"]["attention"] == 0
    assert manifest["settings"]["fuse_attention"] is False
