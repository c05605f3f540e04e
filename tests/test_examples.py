"""Every example in examples/ runs: the YAMLs through the command line, the scripts on tiny models."""

from __future__ import annotations

import runpy
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import lm_decoder
from fwsvd_deploy import save_model
from fwsvd_deploy.cli import main
from fwsvd_deploy.config import PipelineConfig, apply_overrides
from fwsvd_deploy.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# tiny-model settings: the examples' own keys stay, only the sizes shrink
TINY_ENCODER = ["data.text_column=sentence", "data.label_column=sentiment", "data.max_length=32",
                "calibration.num_samples=16", "calibration.batch_size=8", "recovery.batch_size=16",
                "validate.batch_sizes=[1]", "validate.seq_lens=[8]", "validate.rounds=2", "validate.warmup=0",
                "validate.memory=false", "gate.max_accuracy_drop=100.0", "gate.max_latency_ratio=null",
                "gate.max_memory_ratio=null"]
TINY_DECODER = ["data.max_length=32", "data.max_eval_samples=8", "calibration.num_samples=8",
                "calibration.batch_size=4", "compression.ratio=0.6", "export.validate_shapes=[[2, 12]]",
                "optimize.validate_shapes=[[2, 12]]", "validate.prompt_len=12", "validate.new_tokens=4",
                "validate.gen_batch_sizes=[1]", "validate.rounds=2", "validate.warmup=1",
                "validate.eval_batch_size=4", "validate.memory_batch=1", "gate.max_perplexity_ratio=1000.0",
                "gate.max_memory_ratio=1.0", "gate.max_decode_latency_ratio=null"]


def _script(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def _sets(assignments: list[str]) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_yaml_is_a_valid_pipeline(name, capsys):
    cfg = PipelineConfig.from_yaml(EXAMPLES / name)
    assert main(["run", "--config", str(EXAMPLES / name), "--dry-run"]) == 0
    assert PipelineConfig.from_dict(yaml.safe_load(capsys.readouterr().out)) == cfg


def test_each_example_yaml_has_its_script():
    scripts = {"encoder-csv.yaml": "encoder_csv.py", "decoder-text.yaml": "decoder_text.py", "search.yaml": "search.py"}
    for yaml_name, script in scripts.items():
        assert (EXAMPLES / yaml_name).is_file() and (EXAMPLES / script).is_file()
        assert f'"{yaml_name}"' in (EXAMPLES / script).read_text()  # the script runs its own YAML


def test_overrides_set_dotted_keys_and_refuse_what_is_not_an_assignment():
    out = apply_overrides({"compression": {"ratio": 0.5}}, ["compression.ratio=0.3", "gate.max_latency_ratio=null",
                                                           "validate.seq_lens=[8, 16]", "model=m"])
    assert out == {"compression": {"ratio": 0.3}, "gate": {"max_latency_ratio": None},
                   "validate": {"seq_lens": [8, 16]}, "model": "m"}
    for bad in ("compression.ratio", "=1", "compression..ratio=1", "model.x=1"):
        with pytest.raises(ConfigError):
            apply_overrides({"model": "m"}, [bad])
    with pytest.raises(ConfigError, match="unknown key"):
        PipelineConfig.from_dict(apply_overrides({}, ["compression.rato=0.3"]))


def test_the_encoder_example_runs_and_its_junit_gates_a_release(tmp_path, tiny_bert_dir, toy_csv, capsys):
    run = tmp_path / "run"
    encoder = _script("encoder_csv.py")
    assert encoder(["--model", str(tiny_bert_dir), "--data", str(toy_csv), "--out", str(run),
                    *_sets(TINY_ENCODER)]) == 0
    out = capsys.readouterr().out
    assert "accuracy: baseline" in out and "PASS accuracy_drop" in out
    # what the README promises a run writes
    assert list((run / "stages").glob("optimize-candidate-*/model.onnx"))
    junit = run / "report" / "junit.xml"
    summary = _script("gate_summary.py")
    assert summary([str(junit)]) == 0
    assert "release allowed" in capsys.readouterr().out
    # a gate no candidate meets: the script and then the JUnit summary both say so with exit 1
    strict = [*TINY_ENCODER, "gate.max_logit_diff=0.0"]
    assert encoder(["--model", str(tiny_bert_dir), "--data", str(toy_csv), "--out", str(run), *_sets(strict)]) == 1
    assert "FAIL max_logit_diff" in capsys.readouterr().out
    assert summary([str(junit)]) == 1
    out = capsys.readouterr().out
    assert "FAIL max_logit_diff" in out and "release blocked" in out


def test_the_gate_summary_never_reads_a_broken_run_as_a_pass(tmp_path, capsys):
    summary = _script("gate_summary.py")
    assert summary([str(tmp_path / "missing.xml")]) == 2
    bad = tmp_path / "bad.xml"
    bad.write_text("<testsuites")
    assert summary([str(bad)]) == 2
    empty = tmp_path / "empty.xml"
    empty.write_text("<testsuites><testsuite name='other'><testcase name='x'/></testsuite></testsuites>")
    assert summary([str(empty)]) == 2
    assert summary([]) == 2
    assert "holds no gate checks" in capsys.readouterr().err


def test_the_decoder_example_runs_on_a_local_text_file(tmp_path, lm_tokenizer, toy_text, capsys):
    model = tmp_path / "llama"
    save_model(lm_decoder("llama", lm_tokenizer), model, lm_tokenizer)
    assert _script("decoder_text.py")(["--model", str(model), "--data", str(toy_text), "--out",
                                       str(tmp_path / "run"), *_sets(TINY_DECODER)]) == 0
    out = capsys.readouterr().out
    assert "perplexity: baseline" in out and "PASS perplexity_ratio" in out


def test_the_search_example_reports_the_best_kept_fraction(tmp_path, tiny_bert_dir, toy_csv, capsys):
    code = _script("search.py")(["--model", str(tiny_bert_dir), "--data", str(toy_csv), "--out", str(tmp_path / "s"),
                                 "--low", "0.4", "--high", "0.8", "--steps", "1",
                                 *_sets([*TINY_ENCODER, "recovery.enabled=false"])])
    out = capsys.readouterr().out
    assert code == 0 and "best kept fraction 0.4" in out
    assert (tmp_path / "s" / "best").is_dir()


def test_the_ci_workflow_runs_the_shipped_files():
    workflow = yaml.safe_load((EXAMPLES / "ci" / "release-gate.yml").read_text())
    commands = [step["run"] for step in workflow["jobs"]["gate"]["steps"] if "run" in step]
    run = next(shlex.split(c) for c in commands if c.startswith("fwsvd-deploy"))
    config, out = run[run.index("--config") + 1], run[run.index("--out") + 1]
    root = EXAMPLES.parent
    assert (root / config).is_file()
    summary = next(shlex.split(c) for c in commands if "gate_summary.py" in c)
    assert (root / summary[1]).is_file() and summary[2] == f"{out}/report/junit.xml"
