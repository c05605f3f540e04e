"""The pipeline for causal language models: its defaults, its checks, and one cached run end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import lm_decoder
from fwsvd_deploy import pipeline, save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import PipelineConfig
from fwsvd_deploy.errors import ConfigError


def test_the_task_picks_the_defaults():
    cfg = PipelineConfig.from_dict({"task": "causal-lm"})
    assert cfg == PipelineConfig.for_task("causal-lm")
    assert cfg.model == "smollm2-135m" and cfg.data.dataset == "speeches"
    assert cfg.compression.method == "fisher-whitened"
    assert cfg.compression.allocation == "loss" and cfg.export.task == "text-generation-with-past"
    assert cfg.gate.max_accuracy_drop is None
    assert cfg.gate.max_perplexity_ratio is not None and not cfg.recovery.enabled
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg  # the printed config reproduces itself
    encoder = PipelineConfig.from_dict({})
    assert encoder == PipelineConfig() and encoder.task == "text-classification" and encoder.export.task == (
        "text-classification")
    # a key given keeps the task's other defaults
    tuned = PipelineConfig.from_dict({"task": "causal-lm", "gate": {"max_perplexity_ratio": 2.0}})
    assert tuned.gate.max_perplexity_ratio == 2.0 and tuned.gate.max_memory_ratio == cfg.gate.max_memory_ratio


def test_the_calibration_section_keeps_its_earlier_name():
    assert PipelineConfig.from_dict({"fisher": {"num_samples": 16}}).calibration.num_samples == 16
    with pytest.raises(ConfigError, match="not both"):
        PipelineConfig.from_dict({"fisher": {}, "calibration": {}})


@pytest.mark.parametrize("data, match", [
    ({"task": "causal-lm", "export": {"task": "text-classification"}}, "does not fit task='causal-lm'"),
    ({"export": {"task": "text-generation-with-past"}}, "does not fit task='text-classification'"),
    ({"task": "speech"}, "task='speech'"),
    # a threshold whose measurement is off is refused with the config, before any stage runs
    ({"validate": {"memory": False}}, "max_memory_ratio needs memory measurement"),
    ({"task": "causal-lm", "validate": {"latency": False}}, "max_decode_latency_ratio needs latency measurement"),
])
def test_contradictions_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig.from_dict(data)


def _config(tmp_path, model, text, **gate):
    cfg = {
        "task": "causal-lm", "model": str(model),
        "data": {"dataset": str(text), "max_length": 32, "max_eval_samples": 8},
        "calibration": {"num_samples": 8, "batch_size": 4},
        "compression": {"ratio": 0.6},
        "export": {"validate_shapes": [[2, 12]]},
        "optimize": {"validate_shapes": [[2, 12]]},
        "validate": {"prompt_len": 12, "new_tokens": 4, "gen_batch_sizes": [1], "rounds": 2, "warmup": 1,
                     "eval_batch_size": 4, "memory_batch": 1},
        "gate": {"max_perplexity_ratio": 1000.0, "max_memory_ratio": 1.0, "max_decode_latency_ratio": None,
                 **gate},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_decoder_pipeline_runs_and_reuses_its_stages(tmp_path, lm_tokenizer, toy_text, capsys):
    model = tmp_path / "llama"
    save_model(lm_decoder("llama", lm_tokenizer), model, lm_tokenizer)
    run = tmp_path / "run"
    code = main(["--quiet", "run", "--config", str(_config(tmp_path, model, toy_text)), "--out", str(run)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "0 of 6 stages from cache" in out and "gate passed" in out
    if pipeline.default_jobs() == 2:  # the baseline's export and optimisation ran beside the candidate's
        assert "[baseline] export and optimisation running in a second process" in out
        assert "[optimize-baseline] done in" in out and "(second process)" in out
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["accuracy"]["task"] == "text-generation-with-past"
    names = {c["name"]: c for c in report["gate"]["checks"]}
    # the PyTorch folders are passed along, so ONNX Runtime is held to PyTorch's perplexity for both models
    assert {"perplexity_ratio", "memory_ratio", "onnx_vs_pytorch_perplexity_baseline",
            "onnx_vs_pytorch_perplexity_candidate"} <= set(names)
    assert all(c["passed"] for c in names.values())
    compressed = next(p for p in (run / "stages").iterdir() if p.name.startswith("compress-"))
    plan = json.loads((compressed / "compression.json").read_text())
    assert plan["task"] == "causal-lm" and plan["compression"]["method"] == "fisher-whitened"
    assert plan["calibration"]["kinds"] == ["fisher", "inputs"] and plan["calibration"]["num_examples"] == 8
    # a stricter perplexity threshold re-runs only the validation, and fails the gate with exit 1
    strict = _config(tmp_path, model, toy_text, max_perplexity_ratio=1e-3)
    assert main(["--quiet", "run", "--config", str(strict), "--out", str(run)]) == 1
    out, err = capsys.readouterr()
    assert "5 of 6 stages from cache" in out and "perplexity_ratio" in err
    # one stage at a time builds the same graphs
    graphs = {p.name: (p / "model.onnx").read_bytes() for p in (run / "stages").glob("optimize-*")}
    assert len(graphs) == 2
    assert main(["--quiet", "run", "--config", str(strict), "--out", str(run), "--force", "--jobs", "1"]) == 1
    out, _ = capsys.readouterr()
    assert "0 of 6 stages from cache" in out and "second process" not in out
    assert {p.name: (p / "model.onnx").read_bytes() for p in (run / "stages").glob("optimize-*")} == graphs


def test_a_task_that_does_not_fit_the_model_is_refused_before_any_work(tmp_path, tiny_llama_dir, toy_text, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "data": {"dataset": str(toy_text)}}))
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a causal language model; set task: causal-lm" in err
    assert not (tmp_path / "o").exists()
    assert main(["run", "--task", "causal-lm", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "--task causal-lm differs from task: text-classification" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_gpu_is_refused_before_the_model_is_converted(tmp_path, monkeypatch, capsys):
    """The embedded decoder is a GGUF file converted on first use (a minute): a missing CUDA provider comes first."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this check is for a machine without CUDA")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the model was resolved before the device was checked")

    monkeypatch.setattr(pipeline, "resolve_model", no_conversion)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"task": "causal-lm", "validate": {"device": "cuda"}}))
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA is not available" in err
    assert not (tmp_path / "o").exists()


def test_the_shipped_decoder_pipeline_is_the_documented_default():
    from pathlib import Path

    shipped = PipelineConfig.from_yaml(Path(__file__).resolve().parents[1] / "examples" / "smollm2.yaml")
    # the file spells the defaults out; 64 windows is what num_samples=None takes for a causal LM
    assert shipped.calibration.num_samples == 64
    assert shipped == PipelineConfig.for_task("causal-lm").__class__.from_dict(
        {**PipelineConfig.for_task("causal-lm").to_dict(), "calibration": {"num_samples": 64}})


def test_search_follows_the_perplexity_ratio(tmp_path, lm_tokenizer, toy_text, capsys):
    model = tmp_path / "llama"
    save_model(lm_decoder("llama", lm_tokenizer), model, lm_tokenizer)
    config = _config(tmp_path, model, toy_text)
    out = tmp_path / "s"
    code = main(["--quiet", "search", "--config", str(config), "--out", str(out), "--low", "0.3", "--high", "0.7",
                 "--steps", "1", "--max-perplexity-ratio", "1e-3"])
    captured = capsys.readouterr()
    assert code == 1 and "no kept fraction in [0.3, 0.7] passes the gate" in captured.err
    summary = json.loads((out / "search-summary" / "search.json").read_text())
    # the high end fails the perplexity check, so the bisection stops there; the metric is the perplexity
    assert [t["ratio"] for t in summary["trials"]] == [0.7] and summary["best_ratio"] is None
    trial = summary["trials"][0]
    assert trial["metric"] == "perplexity" and trial["failed_checks"] == ["perplexity_ratio"]
    assert summary["gate"]["max_perplexity_ratio"] == 1e-3


def test_search_under_a_fixed_int4_quantisation(tmp_path, lm_tokenizer, toy_text, capsys):
    """``optimize: {quantize: int4}`` quantises both graphs of every trial; the report shows the bytes of each
    weight kind."""
    model = tmp_path / "llama"
    save_model(lm_decoder("llama", lm_tokenizer), model, lm_tokenizer)
    config = _config(tmp_path, model, toy_text)
    data = yaml.safe_load(config.read_text())
    data["optimize"] |= {"quantize": "int4", "block_size": 32}
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "s"
    code = main(["--quiet", "search", "--config", str(config), "--out", str(out), "--low", "0.3", "--high", "0.7",
                 "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    optimized = list((out / "stages").glob("optimize-*"))
    assert len(optimized) >= 2 and any(p.name.startswith("optimize-baseline-") for p in optimized)
    for folder in optimized:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["quantization"]["scheme"] == "int4" and manifest["quantization"]["block_size"] == 32
    report = next((out / "search").glob("ratio-*")) / "report.md"
    text = report.read_text()
    assert "| matrix weights: int4 (MB) |" in text and "| matrix weights: float (MB) |" in text
