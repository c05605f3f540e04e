"""Validation, the gate, the reports, and the cached pipeline, on tiny models."""

from __future__ import annotations

import copy
import json
import shutil
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
from fwsvd_deploy.manifest import verify_manifest
from fwsvd_deploy.validators.report import SCHEMA
from fwsvd_deploy.validators.validate import validate

FAST = ValidateConfig(batch_sizes=(1, 4), seq_lens=(8, 16), rounds=5, warmup=1, memory_batch=2, memory_seq=16)
QUICK = ValidateConfig(latency=False, memory=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny BERT that has learned the toy task, a close compressed copy (SVD keeping 0.9) and a damaged one
    (rank 1, head flipped), all optimised ONNX folders."""
    root = tmp_path_factory.mktemp("validate")
    model = tiny_model("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    finetune(model, toy_data(128), tokenizer, FinetuneConfig(epochs=6, learning_rate=3e-3, batch_size=16,
                                                             warmup_ratio=0.0), max_length=32, progress=False)
    save_model(model, root / "base", tokenizer)
    close = copy.deepcopy(model)
    compress(close, CompressionConfig(method="svd", ratio=0.9))
    save_compressed(close, root / "close", tokenizer)
    compress(model, CompressionConfig(method="svd", rank=1))
    with torch.no_grad():  # rank 1 alone leaves this easy toy task intact; a flipped head does not
        model.classifier.weight.neg_()
        model.classifier.bias.neg_()
    save_compressed(model, root / "damaged", tokenizer)
    out = {}
    for name in ("base", "close", "damaged"):
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


def _predictions(folder, texts, tokenizer):
    """Predicted classes of an ONNX folder, computed here without the validator's code."""
    from fwsvd_deploy.exporters.runtime import make_session, run_session

    session = make_session(folder / "model.onnx")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=32, return_tensors="np")
    feed = {i.name: enc[i.name].astype("int64") for i in session.get_inputs()}
    return run_session(session, feed)["logits"].argmax(-1)


def test_a_close_candidate_passes_every_check(trained, tmp_path, tokenizer):
    # tiny graphs run in microseconds, where per-operator overhead (and a shared machine) sets the ratio
    gate = GateConfig(max_accuracy_drop=5.0, min_agreement=0.9, max_logit_diff=10.0, max_memory_ratio=1.0,
                      max_latency_ratio=100.0)
    result = validate(trained["base"], trained["close"], _data(trained["csv"]), FAST, gate, tmp_path / "r")
    names = [c.name for c in result.checks]
    assert names == ["accuracy_drop", "agreement", "max_logit_diff", "latency_ratio", "memory_ratio",
                     "fused_operators"]
    assert result.passed, result.checks
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    # the agreement is that of the two graphs' own predictions on the evaluation rows
    from fwsvd_deploy.data import load_eval_split

    texts = load_eval_split(_data(trained["csv"])).texts
    base, close = _predictions(trained["base"], texts, tokenizer), _predictions(trained["close"], texts, tokenizer)
    assert report["accuracy"]["comparison"]["agreement"] == pytest.approx(float((base == close).mean()))
    assert report["accuracy"]["examples"] == len(texts) == 40
    assert report["memory"]["candidate"]["disk_bytes"] < report["memory"]["baseline"]["disk_bytes"]
    assert report["memory"]["baseline"]["host"]["session_mb"] > 0
    assert report["memory"]["baseline"]["device"] == {"available": False,
                                                     "reason": "CPU execution provider: no device memory"}
    assert len(report["latency"]["cells"]) == 4 and report["environment"]["cores"]
    suite = ET.parse(tmp_path / "r" / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "0"
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
    ok = main(["--quiet", "validate", "--baseline", str(trained["base"]), "--candidate", str(trained["close"]),
               "--out", str(tmp_path / "a"), "--max-accuracy-drop", "5", *common])
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


def test_a_candidate_whose_head_names_other_classes_is_an_input_error(trained, tmp_path):
    """The same head with id2label swapped would read as a 50-point accuracy drop; it is refused instead."""
    swapped = tmp_path / "swapped"
    shutil.copytree(trained["close"], swapped)
    config = json.loads((swapped / "config.json").read_text())
    config["id2label"] = {"0": "positive", "1": "negative"}
    config["label2id"] = {"positive": 0, "negative": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="baseline classes \\['negative', 'positive'\\] differ from candidate "
                                          "classes \\['positive', 'negative'\\]"):
        validate(trained["base"], swapped, _data(trained["csv"]), FAST, GateConfig(), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_eval_batch_size_reaches_the_accuracy_pass(trained, tmp_path, monkeypatch, capsys):
    from fwsvd_deploy.validators import validate as validate_module

    sizes = []
    real = validate_module.evaluate_onnx

    def spy(folder, data, **kwargs):
        sizes.append(kwargs["batch_size"])
        return real(folder, data, **kwargs)

    monkeypatch.setattr(validate_module, "evaluate_onnx", spy)
    code = main(["--quiet", "validate", "--baseline", str(trained["base"]), "--candidate", str(trained["close"]),
                 "--out", str(tmp_path / "r"), "--dataset", str(trained["csv"]), "--max-length", "32",
                 "--eval-fraction", "0.5", "--no-latency", "--no-memory", "--eval-batch-size", "7",
                 "--max-accuracy-drop", "5"])
    assert code == 0, capsys.readouterr().err
    assert sizes == [7, 7]


def test_validation_reads_no_training_split(trained, tmp_path):
    """With --eval-dataset, the training data need not exist at all."""
    data = DataConfig(dataset=str(tmp_path / "no-such-train.csv"), eval_dataset=str(trained["csv"]), max_length=32)
    result = validate(trained["base"], trained["close"], data, QUICK, GateConfig(max_accuracy_drop=5.0),
                      tmp_path / "r")
    assert result.report["accuracy"]["examples"] == 80


def test_sequence_lengths_beyond_the_models_positions_are_refused_first(trained, tmp_path, monkeypatch):
    from fwsvd_deploy.validators import validate as validate_module

    monkeypatch.setattr(validate_module, "evaluate_onnx", lambda *a, **k: pytest.fail("accuracy pass ran"))
    for cfg, match in ((FAST.__class__(seq_lens=(8, 1000), memory=False), "seq_lens 1000 is longer than the 128"),
                       (FAST.__class__(latency=False, memory_seq=129), "memory_seq 129 is longer than the 128")):
        with pytest.raises(ConfigError, match=match):
            validate(trained["base"], trained["close"], _data(trained["csv"]), cfg, GateConfig(), tmp_path / "r")
    with pytest.raises(ConfigError, match="max_length 999 is longer than the 128"):
        validate(trained["base"], trained["close"], DataConfig(dataset=str(trained["csv"]), max_length=999), QUICK,
                 GateConfig(), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_output_may_not_be_an_input(trained, tmp_path):
    from fwsvd_deploy.errors import OutputPathError

    base = tmp_path / "base"
    shutil.copytree(trained["base"], base)
    before = sorted(p.name for p in base.iterdir())
    with pytest.raises(OutputPathError, match="is the input"):
        validate(base, trained["close"], _data(trained["csv"]), QUICK, GateConfig(), base, overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == before


def test_a_lost_fusion_fails_the_gate_unless_allowed(trained, tmp_path):
    """A candidate optimised only at O1 has none of the baseline's fused operators: the gate fails on it."""
    root = trained["root"]
    o1 = optimize_onnx(root / "close-onnx", OptimizeConfig(level="O1"), tmp_path / "o1").out_dir
    result = validate(trained["base"], o1, _data(trained["csv"]), QUICK, GateConfig(max_accuracy_drop=5.0),
                      tmp_path / "r", raise_on_failure=False)
    check = next(c for c in result.checks if c.name == "fused_operators")
    base = json.loads((trained["base"] / "manifest.json").read_text())["fusions"]
    lost = json.loads((o1 / "manifest.json").read_text())["fusions"]
    assert check.value == sum(max(0, n - lost.get(k, 0)) for k, n in base.items()) >= base["attention"] == 2
    assert not result.passed and not check.passed and "2 attention" in check.detail
    # the same graph, recorded as optimised with allow_fusion_loss: passes, and the report says why
    manifest = json.loads((o1 / "manifest.json").read_text())
    manifest["settings"]["allow_fusion_loss"] = True
    (o1 / "manifest.json").write_text(json.dumps(manifest))
    allowed = validate(trained["base"], o1, _data(trained["csv"]), QUICK, GateConfig(max_accuracy_drop=5.0),
                       tmp_path / "r2")
    check = next(c for c in allowed.checks if c.name == "fused_operators")
    assert allowed.passed and check.passed and "allowed" in check.detail
    assert "allowed: the candidate was optimised with allow_fusion_loss" in (tmp_path / "r2" / "report.md").read_text()


def test_a_cuda_graph_validated_on_cpu_says_so(trained, tmp_path):
    root = trained["root"]
    cuda = optimize_onnx(root / "close-onnx", OptimizeConfig(device="cuda"), tmp_path / "cuda").out_dir
    result = validate(trained["base"], cuda, _data(trained["csv"]), QUICK, GateConfig(max_accuracy_drop=5.0),
                      tmp_path / "r")
    assert any("candidate graph was built for CUDA" in n for n in result.report["notes"])
    assert "Note: the candidate graph was built for CUDA" in (tmp_path / "r" / "report.md").read_text()


def test_a_cpu_graph_validated_on_a_gpu_says_so():
    """The reverse: a CPU graph (a decoder's fused attention is the CPU's) timed on CUDA is not the target build."""
    from fwsvd_deploy.validators.validate import _notes

    described = {"baseline": {"built_for": "cpu", "fusions_complete": True},
                 "candidate": {"built_for": "cuda", "fusions_complete": True}}
    notes = _notes(described, ValidateConfig(device="tensorrt"))
    assert len(notes) == 1 and "baseline graph was built for the CPU and validated on TENSORRT" in notes[0]
    assert "--device cuda" in notes[0] and not _notes(described | {"baseline": described["candidate"]},
                                                      ValidateConfig(device="cuda"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_accuracy_drop", -1.0), ("max_accuracy_drop", 101.0), ("min_agreement", 0.0), ("min_agreement", 1.5),
     ("max_latency_ratio", 0.0), ("max_memory_ratio", -1.0), ("max_logit_diff", -0.1)],
)
def test_thresholds_no_candidate_could_meet_or_fail_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        GateConfig(**{field: value})


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


def test_pipeline_runs_and_reuses_cached_stages(trained, tmp_path, capsys, monkeypatch):
    config = _pipeline_yaml(trained, tmp_path)
    run = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(run)]) == 0
    first = capsys.readouterr().out
    assert "0 of 7 stages from cache" in first and "gate passed" in first
    stages = sorted(p.name for p in (run / "stages").iterdir() if p.name != "calibration")
    assert all(verify_manifest(run / "stages" / name) is None for name in stages)  # compress, recovery too
    assert {json.loads((run / "stages" / n / "manifest.json").read_text())["kind"] for n in stages} == {
        "compress", "recovery", "onnx-export", "onnx-optimized"}
    # a changed threshold re-runs only the validation
    config = _pipeline_yaml(trained, tmp_path, max_logit_diff=0.0)
    assert main(["--quiet", "run", "--config", str(config), "--out", str(run)]) == 1
    second = capsys.readouterr()
    assert "6 of 7 stages from cache" in second.out and "max_logit_diff" in second.err
    written = PipelineConfig.from_yaml(run / "pipeline.yaml")
    assert written == PipelineConfig.from_yaml(config)  # the written config reproduces the run
    assert not list((run / "stages").glob(".*partial*"))
    # a change to the optimiser's code invalidates both optimised graphs; an edited export is rebuilt
    from fwsvd_deploy import pipeline

    real = pipeline.code_fingerprint
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda stage: real(stage) + ("x" if stage == "optimize" else ""))
    exported = next(run / "stages" / n for n in stages if n.startswith("export-candidate"))
    (exported / "config.json").write_text((exported / "config.json").read_text() + "\n")
    assert main(["--quiet", "run", "--config", str(config), "--out", str(run)]) == 1
    out = capsys.readouterr().out
    assert "3 of 7 stages from cache" in out
    assert f"[export-candidate] not reusing {exported}: the files of" in out
    assert verify_manifest(exported) is None
    assert len([p for p in (run / "stages").iterdir() if p.name.startswith("optimize-")]) == 4


def test_pipeline_keys_name_what_made_the_artifact(monkeypatch):
    """Package versions, the stage's own code and the hub revision are in the key; check-only settings are not."""
    from fwsvd_deploy import pipeline

    base = pipeline.stage_key("optimize", "k", {"level": "O2"})
    assert pipeline.stage_key("optimize", "k", {"level": "O3"}) != base
    monkeypatch.setattr(pipeline, "package_versions", lambda: {"onnxruntime": "0.0.1"})
    assert pipeline.stage_key("optimize", "k", {"level": "O2"}) != base
    monkeypatch.setattr(pipeline, "package_versions", lambda: {"torch": "0.0.1"})  # HQQ fits its weights with torch
    torch_key = pipeline.stage_key("optimize", "k", {"level": "O2"})
    monkeypatch.setattr(pipeline, "package_versions", lambda: {"torch": "0.0.2", "transformers": "0.0.1"})
    other_torch = pipeline.stage_key("optimize", "k", {"level": "O2"})
    assert other_torch != torch_key
    monkeypatch.setattr(pipeline, "package_versions", lambda: {"torch": "0.0.2", "transformers": "0.0.2"})
    assert pipeline.stage_key("optimize", "k", {"level": "O2"}) == other_torch  # transformers: not used here
    assert set(pipeline._without(OptimizeConfig().to_dict(), pipeline._CHECK_ONLY["optimize"])) == {
        "device", "level", "fp16", "quantize", "block_size", "symmetric", "quantizer", "accuracy_level",
        "quantize_lm_head", "per_channel", "factor_split", "fuse_attention", "pack_matmuls", "genai"}
    # lowrank.py (the restore) and attention.py are code the optimise stage runs; families.py chooses its passes
    assert {"exporters", "families.py"} <= set(pipeline.STAGE_CODE["optimize"])

    class Config:
        _commit_hash = "abc123"

    monkeypatch.setattr(pipeline, "load_config", lambda spec: Config)
    assert pipeline.source_identity("some-org/some-model") == "some-org/some-model@abc123"


def test_run_honours_the_output_contract(trained, tmp_path, capsys):
    config = _pipeline_yaml(trained, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["--quiet", "run", "--config", str(config), "--out", str(mine)]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # input errors are found before the output folder is created
    bad = _pipeline_yaml(trained, tmp_path, max_accuracy_drop=1.0)
    bad.write_text(bad.read_text().replace("max_length: 32", "max_length: 32\n  text_column: review"))
    assert main(["--quiet", "run", "--config", str(bad), "--out", str(tmp_path / "new")]) == 2
    assert "has no column(s) review" in capsys.readouterr().err and not (tmp_path / "new").exists()
    config = _pipeline_yaml(trained, tmp_path)
    # --overwrite replaces a foreign folder only once the run is complete
    assert main(["--quiet", "run", "--config", str(config), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "report" / "report.json").is_file()
    assert not list(tmp_path.glob(".mine.old-*"))


def test_a_yaml_rank_replaces_the_default_ratio(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("compression: {rank: 8}\n")
    assert main(["run", "--config", str(path), "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["compression"]["rank"] == 8 and printed["compression"]["ratio"] is None


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
        ("gate:\n  max_accuracy_drop: one\n", "max_accuracy_drop='one' must be a finite number"),
        ("gate:\n  max_accuracy_drop: -1\n", "max_accuracy_drop=-1 must be in [0.0, 100.0]"),
        ("compression:\n  target_modules: '('\n", "target_modules='(' is not a valid regular expression"),
        ("validate:\n  batch_sizes: [0]\n", "batch_sizes"),
        ("compression: 3\n", "must be a mapping"),
        ("[1, 2", "not valid YAML"),
    ],
)
@pytest.mark.parametrize("command", [["run", "--dry-run"], ["run"], ["search"]])
def test_bad_pipeline_configs_exit_2(tmp_path, capsys, content, match, command):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    assert main([*command, "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_the_resolved_default(capsys):
    assert main(["run", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert PipelineConfig.from_dict(printed) == PipelineConfig()
    assert printed["model"] == "all-MiniLM-L6-v2" and printed["compression"]["method"] == "fisher-whitened"
    assert printed["compression"]["allocation"] == "loss"


def test_search_keeps_the_best_candidate(trained, tmp_path, capsys):
    # this easy task keeps its accuracy even at 0.1, so the low end passes and is kept
    config = _pipeline_yaml(trained, tmp_path, max_accuracy_drop=0.0)
    code = main(["--quiet", "search", "--config", str(config), "--out", str(tmp_path / "s"), "--low", "0.1",
                 "--high", "0.9", "--steps", "2"])
    captured = capsys.readouterr()
    out = captured.out
    summary = json.loads((tmp_path / "s" / "search-summary" / "search.json").read_text())
    assert code == 0, captured.err
    assert summary["best_ratio"] == 0.1 and [t["ratio"] for t in summary["trials"]] == [0.1, 0.9]
    assert (tmp_path / "s" / "best" / "model.onnx").is_file() and "best kept fraction 0.1" in out
    assert (tmp_path / "s" / "search-summary" / "search.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((tmp_path / "s" / "best" / "manifest.json").read_text())
    assert best["input"]["compressed"] is True
    # one Fisher pass served every trial
    assert len(list((tmp_path / "s" / "stages" / "calibration").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("metric", ["accuracy", "pearson"])
def test_search_bisects_to_the_threshold(monkeypatch, tmp_path, metric):
    """Bisection against a gate whose accuracy check passes from 0.37 up and whose size check fails above 0.8."""
    from types import SimpleNamespace

    from fwsvd_deploy import pipeline
    from fwsvd_deploy.config import SearchConfig

    def fake_run(cfg, out, *, report_dir, **kwargs):
        ratio = cfg.compression.ratio
        checks = [SimpleNamespace(name="accuracy_drop", passed=ratio >= 0.37),
                  SimpleNamespace(name="memory_ratio", passed=ratio <= 0.8)]
        passed = all(c.passed for c in checks)
        report = {"accuracy": {"primary_metric": metric, "baseline": {metric: 0.9},
                               "candidate": {metric: 0.9 if ratio >= 0.37 else 0.5}}}
        report_dir.mkdir(parents=True)
        validation = SimpleNamespace(passed=passed, report=report, checks=checks, out_dir=report_dir)
        candidate = tmp_path / f"cand-{ratio}"
        candidate.mkdir(exist_ok=True)
        (candidate / "model.onnx").write_text(str(ratio))
        return SimpleNamespace(passed=passed, validation=validation, candidate_dir=candidate)

    monkeypatch.setattr(pipeline, "run_stages", fake_run)
    monkeypatch.setattr(pipeline, "check_pipeline", lambda *a, **k: None)
    result = pipeline.search_ratio(PipelineConfig(), tmp_path / "s", SearchConfig(low=0.1, high=0.9, steps=5),
                                   log=lambda *_: None)
    tried = [t.ratio for t in result.trials]
    assert tried == sorted(tried) and tried[0] == 0.1 and tried[-1] == 0.9 and len(tried) == 7
    assert 0.37 <= result.best_ratio <= 0.37 + 0.8 / 2**5
    assert all(t.accuracy_passed == (t.ratio >= 0.37) for t in result.trials)
    assert not next(t for t in result.trials if t.ratio == 0.9).passed  # the size check fails up there
    assert (result.best_dir / "model.onnx").read_text() == str(result.best_ratio)
    # the task's own main metric is reported (regression has no accuracy)
    assert all(t.metric == metric and t.metric_candidate in (0.9, 0.5) for t in result.trials)
    assert f"| {metric} (baseline) |" in (tmp_path / "s" / "search-summary" / "search.md").read_text()


@pytest.mark.parametrize(("low", "high", "steps", "match"), [(0.9, 0.1, 2, "low < high"), (0.0, 0.5, 2, "--low 0.0"),
                                                            (0.1, 1.5, 2, "--high 1.5"), (0.1, 0.9, 0, "--steps 0")])
def test_a_search_range_that_cannot_bisect_is_refused(tmp_path, capsys, low, high, steps, match):
    code = main(["search", "--low", str(low), "--high", str(high), "--steps", str(steps), "--out", str(tmp_path / "s")])
    assert code == 2 and match in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_search_with_an_impossible_gate_exits_1(trained, tmp_path, capsys):
    config = _pipeline_yaml(trained, tmp_path, max_logit_diff=0.0)
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
