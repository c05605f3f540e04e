"""Validation and the gate for causal language models: perplexity through ONNX Runtime and PyTorch, greedy agreement,
generation speed with the KV cache, memory, the report, and every bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import xml.etree.ElementTree as ET

import jsonschema
import numpy as np
import pytest
import torch

from conftest import DECODER_CONFIGS, TOL, VOCAB, export_decoder, tiny_decoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import DataConfig, ExportConfig, GateConfig, ValidateConfig
from fwsvd_deploy.errors import ConfigError
from fwsvd_deploy.exporters import export_onnx
from fwsvd_deploy.exporters.runtime import ONNX_FILE, make_session
from fwsvd_deploy.training import evaluate_lm
from fwsvd_deploy.validators.decoder import CAUSAL_LM_TASK, DecoderGraph
from fwsvd_deploy.validators.gate import check_thresholds_apply, evaluate_gate
from fwsvd_deploy.validators.generation import Generation, generation_tokens, interleaved_generations
from fwsvd_deploy.validators.perplexity import PARITY_RTOL, Tally, score_batch
from fwsvd_deploy.validators.report import SCHEMA
from fwsvd_deploy.validators.validate import validate

DATA = DataConfig(dataset="speeches", eval_split="test", max_length=32, max_eval_samples=8)
FAST = ValidateConfig(prompt_len=8, new_tokens=4, gen_batch_sizes=(1, 2), rounds=3, warmup=1, memory_batch=2)
NO_ENCODER_GATE = {"max_accuracy_drop": None}
POSITIONS = DECODER_CONFIGS["llama"]().max_position_embeddings


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer, tiny_bert_dir):
    """Tiny Llama (grouped-query attention) as baseline; a low-rank copy; a copy with confidently wrong logits; the
    baseline as ONNX Runtime's optimiser fuses it; the baseline without its KV cache; a GPT-2; a BERT classifier."""
    root = tmp_path_factory.mktemp("lm")
    out = {"root": root}
    base = tiny_decoder("llama")
    damaged = copy.deepcopy(base)
    with torch.no_grad():  # every logit times 8, exactly: the same greedy tokens, a far worse perplexity
        damaged.model.norm.weight.mul_(8.0)
    candidate = copy.deepcopy(base)
    compress(candidate, CompressionConfig(method="svd", ratio=0.5))
    for name, model in (("base", base), ("damaged", damaged)):
        save_model(model, root / f"{name}-pt", tokenizer)
        out[f"{name}-pt"] = root / f"{name}-pt"
        out[name] = export_decoder(model, tokenizer, root / name)
    save_compressed(candidate, root / "cand-pt", tokenizer)
    out["cand-pt"] = root / "cand-pt"
    out["cand"] = export_decoder(candidate, tokenizer, root / "cand")
    out["nopast"] = export_decoder(base, tokenizer, root / "nopast", task="text-generation")
    out["gpt2"] = export_decoder(tiny_decoder("gpt2"), tokenizer, root / "gpt2")
    out["fused"] = _ort_optimised(out["base"], root / "fused")
    out["bert"] = export_onnx(tiny_bert_dir, ExportConfig(), root / "bert").out_dir
    return out


def _ort_optimised(folder, out):
    """The graph as ONNX Runtime's transformer optimiser rewrites a Llama: contrib operators for RoPE and RMSNorm."""
    from onnxruntime.transformers.optimizer import optimize_model

    shutil.copytree(folder, out)
    optimized = optimize_model(str(folder / ONNX_FILE), model_type="gpt2", num_heads=4, hidden_size=32, opt_level=0)
    optimized.save_model_to_file(str(out / ONNX_FILE))
    return out


def _report(folder):
    report = json.loads((folder / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    return report


# --- the arithmetic -------------------------------------------------------------------------------------------------


def test_scores_on_hand_built_logits():
    ids = np.array([[3, 1, 2, 0]])
    uniform = np.zeros((1, 4, 5), dtype=np.float32)
    nll, tokens, _ = score_batch(uniform, ids)
    assert tokens == 3 and nll == pytest.approx(3 * math.log(5), rel=TOL["identity"])
    sharp = np.full((1, 4, 5), -30.0, dtype=np.float32)
    sharp[0, np.arange(3), ids[0, 1:]] = 30.0  # position t puts all its mass on token t + 1
    nll, _, predicted = score_batch(sharp, ids)
    assert (predicted == ids[:, 1:]).all() and nll < 1e-20
    sharp[0, 0] = sharp[0, 1]  # position 0 now predicts token 2; its target is 1
    nll, _, predicted = score_batch(sharp, ids)
    assert predicted[0, 0] == 2 and nll == pytest.approx(60.0, rel=TOL["identity"])
    tally = Tally()
    tally.add(nll, 3, predicted, ids)
    assert tally.metrics() == {"perplexity": math.exp(20.0), "nll": 20.0, "next_token_accuracy": 2 / 3}


def test_perplexity_is_transformers_loss_token_weighted():
    """The definition validate applies to PyTorch (and, through the same reduction, to ONNX Runtime's logits)."""
    model = tiny_decoder("llama")
    windows = np.random.default_rng(0).integers(0, VOCAB, size=(3, 16))
    ours = evaluate_lm(model, torch.from_numpy(windows), batch_size=2).metrics["perplexity"]
    with torch.no_grad():
        losses = [float(model(input_ids=torch.from_numpy(w[None]), labels=torch.from_numpy(w[None])).loss)
                  for w in windows]
    assert ours == pytest.approx(math.exp(np.mean(losses)), rel=TOL["perplexity_reduction"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_cached_decode_steps_match_pytorch(arch, tmp_path, tokenizer):
    """The timed loop computes what it claims: decode steps fed the presents give PyTorch's full-forward logits."""
    model = tiny_decoder(arch)
    folder = export_decoder(model, tokenizer, tmp_path / arch)
    session = make_session(folder / ONNX_FILE)
    graph = DecoderGraph.from_session(session, folder)
    tokens = generation_tokens(graph.vocab, 2, 13)
    _, decode_ms, logits = Generation(session, graph, tokens, 9, "cpu").run(keep_logits=True)
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert len(decode_ms) == len(logits) == 4
    for step, got in enumerate(logits):
        assert np.abs(got[:, 0] - reference[:, 9 + step]).max() <= TOL["kv_cache_logits"]


def test_generations_are_interleaved_call_by_call():
    """Step t of every model runs before step t + 1 of any, so slow spells of the machine fall on all alike."""
    log = []

    class Runner:
        def __init__(self, name):
            self.name, self.round = name, 0

        def calls(self):
            self.round += 1
            for call in range(3):  # prefill, two decode steps
                log.append((self.name, self.round, call))
                yield 10.0 * self.round + call

    runs = interleaved_generations({"a": Runner("a"), "b": Runner("b")}, warmup=1, rounds=2)
    assert [entry[0] for entry in log] == ["a", "b"] * 3 + ["b", "a"] * 3 + ["a", "b"] * 3  # order alternates
    assert [entry[2] for entry in log] == [0, 0, 1, 1, 2, 2] * 3
    assert runs == {"a": [(20.0, [21.0, 22.0]), (30.0, [31.0, 32.0])],  # the warm-up round (1x) is not kept
                    "b": [(20.0, [21.0, 22.0]), (30.0, [31.0, 32.0])]}


# --- validate on tiny models ----------------------------------------------------------------------------------------


def test_report_of_a_low_rank_candidate(lm, tmp_path):
    gate = GateConfig(**NO_ENCODER_GATE, min_agreement=0.5, max_memory_ratio=1.0, max_perplexity_ratio=1.05,
                      max_decode_latency_ratio=50.0, max_prefill_latency_ratio=50.0)
    result = validate(lm["base"], lm["cand"], DATA, FAST, gate, tmp_path / "r",
                      pytorch_models={"baseline": lm["base-pt"], "candidate": lm["cand-pt"]})
    report = _report(tmp_path / "r")
    acc = report["accuracy"]
    assert acc["task"] == CAUSAL_LM_TASK and acc["primary_metric"] == "perplexity" and acc["examples"] == 8
    assert acc["windows"] == {"length": 32, "stride": 32, "count": 8, "scored_tokens": 8 * 31, "batch": 8, "seed": 0}
    assert 0.5 < acc["comparison"]["agreement"] < 1.0  # the factorised model picks some other tokens
    assert acc["comparison"]["perplexity_ratio"] == acc["candidate"]["perplexity"] / acc["baseline"]["perplexity"]
    for role in ("baseline", "candidate"):
        parity = acc["pytorch"][role]
        assert parity["relative_diff"] <= TOL["onnx_vs_torch_perplexity"]
        assert parity["onnx_perplexity"] == acc[role]["perplexity"]
    gen = report["generation"]
    assert [c["batch"] for c in gen["cells"]] == [1, 2] and gen["prompt_tokens"] == 8 and gen["new_tokens"] == 4
    for cell in gen["cells"]:
        b, c = cell["models"]["baseline"], cell["models"]["candidate"]
        assert b["prefill"]["runs"] == 3 and b["decode"]["runs"] == 3 * 4 and b["decode_per_round"]["runs"] == 3
        assert b["decode_tokens_per_s"] == pytest.approx(cell["batch"] * 1000 / b["decode"]["mean_ms"])
        assert cell["ratios"]["candidate"]["decode"]["p50"] == pytest.approx(
            c["decode_per_round"]["p50_ms"] / b["decode_per_round"]["p50_ms"])
    assert report["latency"] is None and gen["environment"]["cores"]
    memory = report["memory"]
    # 2 layers x (key, value) x 2 key/value heads x head size 8 x 4 bytes
    assert memory["baseline"]["kv_cache_bytes_per_token"] == memory["candidate"]["kv_cache_bytes_per_token"] == 256
    assert memory["baseline"]["host"]["session_mb"] > 0 and memory["candidate"]["parameters"] < memory["baseline"][
        "parameters"]
    checks = {c.name: c for c in result.checks}
    assert list(checks) == ["agreement", "memory_ratio", "perplexity_ratio", "decode_latency_ratio",
                            "prefill_latency_ratio", "onnx_vs_pytorch_perplexity_baseline",
                            "onnx_vs_pytorch_perplexity_candidate"]
    worst = max(c["ratios"]["candidate"]["decode"]["p50"] for c in gen["cells"])
    assert checks["decode_latency_ratio"].value == worst
    assert checks["perplexity_ratio"].passed == (acc["comparison"]["perplexity_ratio"] <= 1.05) == result.passed
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "7"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "8 windows of 32 tokens of speeches[test]" in md and "## Generation with the KV cache" in md
    assert "| KV-cache bytes per token | 256 | 256 | 1.000 |" in md and "ONNX Runtime vs PyTorch" in md
    assert (tmp_path / "r" / "generation.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "r" / "latency.png").exists() and (tmp_path / "r" / "manifest.json").is_file()


def test_parity_on_the_first_windows_compares_the_same_windows(lm, tmp_path):
    """parity_windows: PyTorch scores the first N windows, ONNX Runtime's figure is of those N (a batch straddles N)."""
    cfg = dataclasses.replace(FAST, parity_windows=3, eval_batch_size=2, latency=False, memory=False)
    result = validate(lm["base"], lm["cand"], DATA, cfg, GateConfig(**NO_ENCODER_GATE), tmp_path / "r",
                      pytorch_models={"baseline": lm["base-pt"], "candidate": lm["cand-pt"]})
    acc = result.report["accuracy"]
    assert acc["windows"]["count"] == 8 and acc["windows"]["batch"] == 2
    for role in ("baseline", "candidate"):
        parity = acc["pytorch"][role]
        assert parity["windows"] == 3
        assert parity["relative_diff"] <= TOL["onnx_vs_torch_perplexity"]
        # the check's ONNX figure is of the 3 windows, not of all 8
        assert abs(parity["onnx_perplexity"] / acc[role]["perplexity"] - 1) > 10 * TOL["onnx_vs_torch_perplexity"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 3 of 8 |" in md


def test_optimised_graph_with_contrib_operators_matches_pytorch(lm, tmp_path):
    import onnx

    ops = {n.op_type for n in onnx.load(str(lm["fused"] / ONNX_FILE)).graph.node if n.domain == "com.microsoft"}
    assert {"RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops
    cfg = ValidateConfig(latency=False, memory=False)
    result = validate(lm["base"], lm["fused"], DATA, cfg, GateConfig(**NO_ENCODER_GATE, min_agreement=1.0),
                      tmp_path / "r", pytorch_models={"candidate": lm["base-pt"]})
    parity = result.report["accuracy"]["pytorch"]
    assert set(parity) == {"candidate"} and parity["candidate"]["relative_diff"] <= TOL["onnx_vs_torch_perplexity"]
    assert result.passed and result.report["generation"] is None and result.report["memory"] is None


def test_parameters_are_the_models_and_leave_out_the_rotary_tables(lm):
    """The fused graph's cos/sin tables are computed, not learned: its count stays the unfused export's."""
    import onnx

    from fwsvd_deploy.validators.memory import parameter_count

    graph = onnx.load(str(lm["fused"] / ONNX_FILE)).graph
    tables = {n.input[i] for n in graph.node if n.op_type == "RotaryEmbedding" for i in (2, 3)}
    table_values = sum(int(np.prod(i.dims)) for i in graph.initializer if i.name in tables)
    assert tables and table_values > 0
    # the optimiser adds a few constants (axes, shapes), not the tables
    assert 0 <= parameter_count(lm["fused"]) - parameter_count(lm["base"]) < min(table_values, 100)


def test_a_worse_candidate_fails_and_every_failure_is_listed(lm, tmp_path, capsys):
    code = main(["--quiet", "validate", "--baseline", str(lm["base"]), "--candidate", str(lm["damaged"]),
                 "--out", str(tmp_path / "r"), "--dataset", "speeches", "--eval-split", "test", "--max-length", "32",
                 "--eval-samples", "8", "--no-latency", "--prompt-len", "8", "--new-tokens",
                 "2", "--max-perplexity-ratio", "1.05", "--min-agreement", "1.0", "--max-memory-ratio", "0.5"])
    out, err = capsys.readouterr()
    assert code == 1, err
    report = _report(tmp_path / "r")
    failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
    assert failed == ["memory_ratio", "perplexity_ratio"]
    assert report["accuracy"]["comparison"]["agreement"] == 1.0  # logits scaled by 8: the same greedy tokens
    assert "perplexity_ratio" in err and "memory_ratio" in err and "perplexity: baseline" in out
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "2"


def test_onnx_against_the_wrong_pytorch_model_fails_the_parity_check(lm, tmp_path):
    cfg = ValidateConfig(latency=False, memory=False)
    result = validate(lm["base"], lm["base"], DATA, cfg, GateConfig(**NO_ENCODER_GATE), tmp_path / "r",
                      pytorch_models={"baseline": lm["damaged-pt"], "candidate": lm["base-pt"]},
                      raise_on_failure=False)
    checks = {c.name: c for c in result.checks}
    assert not result.passed and set(checks) == {"onnx_vs_pytorch_perplexity_baseline",
                                                 "onnx_vs_pytorch_perplexity_candidate"}
    assert checks["onnx_vs_pytorch_perplexity_baseline"].value > PARITY_RTOL
    assert checks["onnx_vs_pytorch_perplexity_candidate"].passed


def test_bench_times_generation(lm, tmp_path, capsys):
    code = main(["--quiet", "bench", "--model", str(lm["base"]), "--model", str(lm["cand"]), "--prompt-len", "8",
                 "--new-tokens", "3", "--gen-batch-sizes", "1,2", "--rounds", "2", "--warmup", "0",
                 "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [c["batch"] for c in result["cells"]] == [1, 2] and set(result["cells"][0]["ratios"]) == {"cand"}
    assert result["cells"][1]["models"]["cand"]["decode"]["runs"] == 2 * 3
    assert "decode / base" in (tmp_path / "b" / "bench.md").read_text()


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------------------


def _bad_validate_cases(lm, tmp_path, tiny_bert_dir):
    short = tmp_path / "short.txt"
    short.write_text("Too short for a window.\n\nStill too short.")
    base, cand = str(lm["base"]), str(lm["cand"])
    return [
        ([base, cand, "--max-length", str(POSITIONS + 1)], f"longer than the {POSITIONS} positions"),
        ([base, cand, "--prompt-len", str(POSITIONS - 4), "--new-tokens", "5"],
         f"{POSITIONS + 1} positions, more than the {POSITIONS}"),
        ([base, cand, "--dataset", str(short), "--eval-fraction", "0.5"], "fewer than one window"),
        ([base, str(lm["bert"])], "is a causal language model"),
        ([str(lm["bert"]), cand], "is a causal language model"),
        ([base, cand, "--max-accuracy-drop", "1"], "max_accuracy_drop does not apply to a causal language model"),
        ([base, cand, "--max-latency-ratio", "1"], "max_latency_ratio does not apply"),
        ([base, str(lm["nopast"])],
         "without its KV cache (inputs input_ids, attention_mask, position_ids); export it with --task "
         "text-generation-with-past"),
        ([base, str(lm["gpt2"])], "compare models of one family"),
        ([base, cand, "--baseline-model", str(tiny_bert_dir)], "not a causal language model"),
        ([base, cand, "--candidate-model", str(tmp_path / "missing")], "does not exist"),
        ([base, cand, "--max-decode-latency-ratio", "1", "--no-latency"], "needs latency measurement"),
        ([base, cand, "--gen-batch-sizes", "0"], "--gen-batch-sizes 0 must be >= 1"),
        ([base, cand, "--new-tokens", "0"], "--new-tokens 0 must be >= 1"),
        ([str(lm["bert"]), str(lm["bert"]), "--max-perplexity-ratio", "1.1"],
         "max_perplexity_ratio does not apply to a text-classification model"),
        ([str(lm["bert"]), str(lm["bert"]), "--baseline-model", str(lm["base-pt"])],
         "applies to causal language models"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(lm, tmp_path, tiny_bert_dir, capsys):
    for i, (args, match) in enumerate(_bad_validate_cases(lm, tmp_path, tiny_bert_dir)):
        baseline, candidate, *rest = args
        out = tmp_path / f"out{i}"
        argv = ["--quiet", "validate", "--baseline", baseline, "--candidate", candidate, "--out", str(out),
                "--dataset", "speeches", "--eval-split", "test", "--max-length", "32", "--prompt-len", "8",
                "--new-tokens", "4", *rest]
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], (rest, err)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))


def test_bench_refuses_mixed_kinds_and_too_long_generations(lm, capsys):
    assert main(["bench", "--model", str(lm["base"]), "--model", str(lm["bert"])]) == 2
    assert "give models of one kind" in capsys.readouterr().err
    assert main(["bench", "--model", str(lm["base"]), "--prompt-len", str(POSITIONS), "--new-tokens", "1"]) == 2
    assert f"more than the {POSITIONS}" in capsys.readouterr().err
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["bench", "--model", str(lm["base"]), "--prompt-len", "8", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


# --- the gate's decisions on hand-built figures ---------------------------------------------------------------------


def _results(perplexity=(20.0, 22.0), decode=(0.9, 1.2), prefill=(0.8, 0.85), parity=None, generation=True):
    cells = [{"batch": b, "ratios": {"candidate": {"decode": {"p50": d}, "prefill": {"p50": p}}}}
             for b, d, p in zip((1, 8), decode, prefill, strict=True)]
    return {"accuracy": {"task": CAUSAL_LM_TASK, "baseline": {"perplexity": perplexity[0]},
                         "candidate": {"perplexity": perplexity[1]}, "comparison": {"agreement": 0.9},
                         "pytorch": parity},
            "generation": {"cells": cells} if generation else None}


@pytest.mark.parametrize(("gate", "results", "expected"), [
    ({"max_perplexity_ratio": 1.1}, _results(), {"perplexity_ratio": True}),  # 22 / 20 == 1.1: not above
    ({"max_perplexity_ratio": 1.1}, _results(perplexity=(20.0, 22.000001)), {"perplexity_ratio": False}),
    ({"max_decode_latency_ratio": 1.0, "max_prefill_latency_ratio": 1.0}, _results(),
     {"decode_latency_ratio": False, "prefill_latency_ratio": True}),  # the worst batch size decides
    ({"max_decode_latency_ratio": 5.0}, _results(generation=False), {"decode_latency_ratio": False}),  # unmeasured
    ({"min_agreement": 0.95}, _results(), {"agreement": False}),
    ({}, _results(parity={"baseline": {"relative_diff": 9.9e-4, "model": "a"},
                          "candidate": {"relative_diff": 1.01e-3, "model": "b"}}),
     {"onnx_vs_pytorch_perplexity_baseline": True, "onnx_vs_pytorch_perplexity_candidate": False}),
])
def test_gate_decisions(gate, results, expected):
    checks = evaluate_gate(GateConfig(max_accuracy_drop=None, **gate), results)
    assert {c.name: c.passed for c in checks} == expected
    if "decode_latency_ratio" in expected and results["generation"]:
        detail = next(c.detail for c in checks if c.name == "decode_latency_ratio")
        assert "the worst batch size (8 of 1, 8)" in detail


@pytest.mark.parametrize(("task", "threshold", "refused"), [
    (CAUSAL_LM_TASK, "max_accuracy_drop", True),
    (CAUSAL_LM_TASK, "max_logit_diff", True),
    (CAUSAL_LM_TASK, "max_perplexity_ratio", False),
    (CAUSAL_LM_TASK, "min_agreement", False),
    (CAUSAL_LM_TASK, "max_memory_ratio", False),
    ("text-classification", "max_decode_latency_ratio", True),
    ("question-answering", "max_prefill_latency_ratio", True),
    ("text-classification", "max_latency_ratio", False),
])
def test_thresholds_for_another_task_are_refused(task, threshold, refused):
    gate = GateConfig(**{"max_accuracy_drop": None, threshold: 1.0})
    if refused:
        with pytest.raises(ConfigError, match=f"{threshold} does not apply"):
            check_thresholds_apply(gate, task)
    else:
        check_thresholds_apply(gate, task)


# --- the real embedded decoder --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_perplexity_through_onnx_runtime_agrees_with_pytorch(tmp_path):
    from fwsvd_deploy.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm("smollm2-135m")
    folder = export_decoder(model, load_tokenizer("smollm2-135m"), tmp_path / "onnx")
    del model
    data = DataConfig(dataset="speeches", eval_split="test", max_length=128, max_eval_samples=4)
    cfg = ValidateConfig(latency=False, memory=False)
    result = validate(folder, folder, data, cfg, GateConfig(**NO_ENCODER_GATE, max_perplexity_ratio=1.0),
                      tmp_path / "r", pytorch_models={"baseline": "smollm2-135m"})
    acc = result.report["accuracy"]
    assert 5 < acc["baseline"]["perplexity"] < 100  # a real language model on real speeches (uniform: 49152)
    assert acc["pytorch"]["baseline"]["relative_diff"] <= TOL["onnx_vs_torch_perplexity"]
    assert acc["comparison"]["agreement"] == 1.0 and result.passed


def test_small_check_values_keep_their_digits():
    from fwsvd_deploy.validators.report import check_value

    assert [check_value(v) for v in (None, 0.0, 3.34e-8, 0.8939, 12.5)] == ["n/a", "0.0000", "3.34e-08", "0.8939",
                                                                           "12.5000"]
