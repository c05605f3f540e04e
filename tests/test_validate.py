"""Validation, the gate, the reports, and the cached pipeline, on tiny models."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import jsonschema
import pytest
import torch
import yaml

from conftest import tiny_model, toy_data
from fwsvd_deploy import CompressionConfig, FinetuneConfig, compress, finetune, save_compressed, save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import DataConfig, ExportConfig, GateConfig, OptimizeConfig, PipelineConfig, ValidateConfig
from fwsvd_deploy.errors import ConfigError, GateFailedError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.validators.report import SCHEMA
from fwsvd_deploy.validators.validate import validate

FAST = ValidateConfig(batch_sizes=(1, 4), seq_lens=(8, 16), rounds=5, warmup=1, memory_batch=2, memory_seq=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny BERT that has learned the toy task and a damaged compressed copy, both optimised ONNX folders."""
    root = tmp_path_factory.mktemp("validate")
    model = tiny_model("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    finetune(model, toy_data(128), tokenizer, FinetuneConfig(epochs=6, learning_rate=3e-3, batch_size=16,
                                                             warmup_ratio=0.0), max_length=32, progress=False)
    save_model(model, root / "base", tokenizer)
    compress(model, CompressionConfig(method="svd", rank=1))
    with torch.no_grad():  # rank 1 alone leaves this easy toy task intact; a flipped head does not
        model.classifier.weight.neg_()
        model.classifier.bias.neg_()
    save_compressed(model, root / "damaged", tokenizer)
    out = {}
    for name in ("base", "damaged"):
        export_onnx(root / name, ExportConfig(), root / f"{name}-onnx")
        out[name] = optimize_onnx(root / f"{name}-onnx", OptimizeConfig(), root / f"{name}-opt").out_dir
    import pandas as pd

    d = toy_data(80, seed=3)
    csv = root / "eval.csv"
    pd.DataFrame({"text": d.texts, "label": [d.label_names[y] for y in d.labels]}).to_csv(csv, index=False)
    out["csv"] = csv
    out["root"] = root
    return out


def _data(csv):
    return DataConfig(dataset=str(csv), max_length=32, eval_fraction=0.5)


def test_identical_candidate_passes_every_check(trained, tmp_path):
    gate = GateConfig(max_accuracy_drop=0.0, min_agreement=1.0, max_logit_diff=0.0, max_memory_ratio=1.0,
                      max_latency_ratio=3.0)
    result = validate(trained["base"], trained["base"], _data(trained["csv"]), FAST, gate, tmp_path / "r")
    assert result.passed and len(result.checks) == 5 and all(c.passed for c in result.checks)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["accuracy"]["baseline"]["accuracy"] == report["accuracy"]["candidate"]["accuracy"] > 0.9
    assert report["memory"]["baseline"]["host"]["session_mb"] > 0
    assert report["memory"]["baseline"]["device"] == {"available": False,
                                                     "reason": "CPU execution provider: no device memory"}
    assert len(report["latency"]["cells"]) == 4 and report["environment"]["cores"]
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "0"
    assert "# Validation: PASSED" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_damaged_candidate_fails_the_accuracy_check(trained, tmp_path):
    gate = GateConfig(max_accuracy_drop=1.0, max_memory_ratio=1.0)
    with pytest.raises(GateFailedError, match="accuracy_drop") as exc:
        validate(trained["base"], trained["damaged"], _data(trained["csv"]), FAST, gate, tmp_path / "r")
    assert exc.value.exit_code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
    assert failed == ["accuracy_drop"] and not report["gate"]["passed"]
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["accuracy_drop"].find("failure") is not None and cases["memory_ratio"].find("failure") is None
    assert "**FAIL**" in (tmp_path / "r" / "report.md").read_text()


def test_cli_exit_codes(trained, tmp_path, capsys):
    common = ["--dataset", str(trained["csv"]), "--max-length", "32", "--eval-fraction", "0.5", "--batch-sizes",
              "1", "--seq-lens", "8", "--rounds", "2", "--no-memory"]
    ok = main(["--quiet", "validate", "--baseline", str(trained["base"]), "--candidate", str(trained["base"]),
               "--out", str(tmp_path / "a"), *common])
    bad = main(["--quiet", "validate", "--baseline", str(trained["base"]), "--candidate", str(trained["damaged"]),
                "--out", str(tmp_path / "b"), *common])
    cuda = main(["--quiet", "validate", "--baseline", str(trained["base"]), "--candidate", str(trained["base"]),
                 "--out", str(tmp_path / "c"), *common, "--device", "cuda"])
    err = capsys.readouterr().err
    assert (ok, bad) == (0, 1) and (tmp_path / "b" / "report.json").is_file()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert cuda == 2 and "CUDA is not available" in err and not (tmp_path / "c").exists()


def test_incompatible_models_and_labels(trained, tmp_path, tokenizer):
    from conftest import tiny_encoder

    distil = tiny_encoder("distilbert", "text-classification")
    save_model(distil, tmp_path / "d", tokenizer)
    export_onnx(tmp_path / "d", ExportConfig(), tmp_path / "d-onnx")
    with pytest.raises(ConfigError, match="inputs"):
        validate(trained["base"], tmp_path / "d-onnx", _data(trained["csv"]), FAST, GateConfig(), tmp_path / "r")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text,label\n" + "good film,great\nbad film,terrible\n" * 5)
    from fwsvd_deploy.errors import DatasetError

    with pytest.raises(DatasetError, match="not in the model's labels"):
        validate(trained["base"], trained["base"], _data(wrong), FAST, GateConfig(), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _pipeline_yaml(trained, tmp_path, **gate):
    cfg = {
        "model": str(trained["root"] / "base"),
        "data": {"dataset": str(trained["csv"]), "max_length": 32, "eval_fraction": 0.5, "max_train_samples": None},
        "finetune": {"enabled": False},
        "fisher": {"num_samples": 16, "batch_size": 8},
        "compression": {"method": "fwsvd", "ratio": 0.5},
        "recovery": {"enabled": True, "epochs": 1, "batch_size": 16, "learning_rate": 1e-5},
        "validate": {"batch_sizes": [1], "seq_lens": [8], "rounds": 2, "warmup": 0, "memory": False,
                     "split": "validation"},
        "gate": {"max_accuracy_drop": 100.0, "max_latency_ratio": None, "min_agreement": None,
                 "max_memory_ratio": None, **gate},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_runs_and_reuses_cached_stages(trained, tmp_path, capsys):
    config = _pipeline_yaml(trained, tmp_path)
    assert main(["--quiet", "run", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out
    assert "0 of 7 stages from cache" in first and "gate passed" in first
    # a changed threshold re-runs only the validation
    config = _pipeline_yaml(trained, tmp_path, max_accuracy_drop=-100.0)
    assert main(["--quiet", "run", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    second = capsys.readouterr()
    assert "6 of 7 stages from cache" in second.out and "accuracy_drop" in second.err
    written = PipelineConfig.from_yaml(tmp_path / "run" / "pipeline.yaml")
    assert written == PipelineConfig.from_yaml(config)  # the written config reproduces the run
    assert not list((tmp_path / "run" / "stages").glob(".*partial*"))


def test_a_threshold_without_its_measurement_is_refused(trained, tmp_path):
    cfg = ValidateConfig(latency=False, memory=False)
    with pytest.raises(ConfigError, match="max_latency_ratio needs latency"):
        validate(trained["base"], trained["base"], _data(trained["csv"]), cfg, GateConfig(max_latency_ratio=1.0),
                 tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("gate:\n  max_acuracy_drop: 1.0\n", "unknown key"),
        ("validation:\n  device: cpu\n", "unknown key"),
        ("gate:\n  max_accuracy_drop: one\n", "max_accuracy_drop='one' must be a number"),
        ("validate:\n  batch_sizes: [0]\n", "batch_sizes"),
        ("compression: 3\n", "must be a mapping"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_pipeline_configs_exit_2(tmp_path, capsys, content, match):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_the_resolved_default(capsys):
    assert main(["run", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert PipelineConfig.from_dict(printed) == PipelineConfig()
    assert printed["model"] == "all-MiniLM-L6-v2" and printed["compression"]["method"] == "fwsvd"


def test_search_keeps_the_best_candidate(trained, tmp_path, capsys):
    # this easy task keeps its accuracy even at 0.1, so the low end passes and is kept
    config = _pipeline_yaml(trained, tmp_path, max_accuracy_drop=0.0)
    code = main(["--quiet", "search", "--config", str(config), "--out", str(tmp_path / "s"), "--low", "0.1",
                 "--high", "0.9", "--steps", "2"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "s" / "search-summary" / "search.json").read_text())
    assert code == 0 and summary["best_ratio"] == 0.1 and [t["ratio"] for t in summary["trials"]] == [0.1, 0.9]
    assert (tmp_path / "s" / "best" / "model.onnx").is_file() and "best kept fraction 0.1" in out
    assert (tmp_path / "s" / "search-summary" / "search.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((tmp_path / "s" / "best" / "manifest.json").read_text())
    assert best["input"]["compressed"] is True
    # one Fisher pass served every trial
    assert len(list((tmp_path / "s" / "stages" / "fisher").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("metric", ["accuracy", "pearson"])
def test_search_bisects_to_the_threshold(monkeypatch, tmp_path, metric):
    """Bisection against a gate whose accuracy check passes from 0.37 up and whose size check fails above 0.8."""
    from types import SimpleNamespace

    from fwsvd_deploy import pipeline

    def fake_run(cfg, out, *, report_dir, **kwargs):
        ratio = cfg.compression.ratio
        checks = [SimpleNamespace(name="accuracy_drop", passed=ratio >= 0.37),
                  SimpleNamespace(name="memory_ratio", passed=ratio <= 0.8)]
        passed = all(c.passed for c in checks)
        report = {"accuracy": {"primary_metric": metric, "baseline": {metric: 0.9},
                               "candidate": {metric: 0.9 if ratio >= 0.37 else 0.5}}}
        validation = SimpleNamespace(passed=passed, report=report, checks=checks, out_dir=report_dir)
        candidate = tmp_path / f"cand-{ratio}"
        candidate.mkdir(exist_ok=True)
        (candidate / "model.onnx").write_text(str(ratio))
        return SimpleNamespace(passed=passed, validation=validation, candidate_dir=candidate)

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    result = pipeline.search_ratio(PipelineConfig(), tmp_path / "s", low=0.1, high=0.9, steps=5, log=lambda *_: None)
    tried = sorted(t["ratio"] for t in result.trials)
    assert tried[0] == 0.1 and tried[-1] == 0.9 and len(tried) == 7
    assert 0.37 <= result.best_ratio <= 0.37 + 0.8 / 2**5
    assert all(t["accuracy_passed"] == (t["ratio"] >= 0.37) for t in result.trials)
    assert not next(t for t in result.trials if t["ratio"] == 0.9)["passed"]  # the size check fails up there
    assert (result.best_dir / "model.onnx").read_text() == str(result.best_ratio)
    # the task's own main metric is reported (regression has no accuracy)
    assert all(t["metric"] == metric and t["metric_candidate"] in (0.9, 0.5) for t in result.trials)
    assert f"| {metric} (baseline) |" in (tmp_path / "s" / "search-summary" / "search.md").read_text()


def test_search_with_an_impossible_gate_exits_1(trained, tmp_path, capsys):
    config = _pipeline_yaml(trained, tmp_path, max_accuracy_drop=-50.0)
    code = main(["--quiet", "search", "--config", str(config), "--out", str(tmp_path / "s"), "--steps", "1"])
    assert code == 1 and "no kept fraction" in capsys.readouterr().err
    assert not (tmp_path / "s" / "best").exists()


def test_bench_writes_its_table_and_keeps_existing_folders(trained, tmp_path, capsys):
    args = ["--quiet", "bench", "--model", str(trained["base"]), "--model", str(trained["damaged"]),
            "--batch-sizes", "1,2", "--seq-lens", "8", "--rounds", "3", "--warmup", "1"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [(c["batch"], c["sequence"]) for c in result["cells"]] == [(1, 8), (2, 8)]
    assert set(result["cells"][0]["ratios"]) == {"damaged-opt"} and "damaged-opt / base-opt" in capsys.readouterr().out
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert main([*args, "--out", str(taken)]) == 2
    assert (taken / "mine.txt").read_text() == "keep" and "not empty" in capsys.readouterr().err
