"""The command line: the happy path on a tiny model, and every bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fwsvd_deploy.cli import main
from fwsvd_deploy.modeling import read_plan


def _run(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _data_args(csv):
    return ["--dataset", str(csv), "--text-column", "sentence", "--label-column", "sentiment", "--max-length", "32"]


def test_finetune_compress_recover(capsys, tmp_path, tiny_bert_dir, toy_csv):
    code, out, err = _run(capsys, "finetune", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "ft"),
                          "--epochs", "1", *_data_args(toy_csv))
    assert code == 0, err
    assert "fine-tuned model" in out and "accuracy" in out
    code, out, err = _run(capsys, "compress", "--model", str(tmp_path / "ft"), "--out", str(tmp_path / "c"),
                          "--ratio", "0.5", "--fisher-axis", "output", "--qkv", "joint",
                          "--rank-multiple", "4", "--fisher-cache", str(tmp_path / "cache"), *_data_args(toy_csv))
    assert code == 0, err
    assert "**fwsvd**, Fisher axis output" in out and "eval accuracy: baseline" in out
    assert "ratio 0.5, ranks multiples of 4" in out
    plan = read_plan(tmp_path / "c")
    assert plan["compression"]["qkv"] == "joint" and sum("shared_down" in v for v in plan["layers"].values()) == 4
    assert plan["compression"]["rank_multiple"] == 4 and all(v["rank"] % 4 == 0 for v in plan["layers"].values())
    assert plan["compression"]["fisher_axis"] == "output" and plan["calibration"]["num_examples"] == 72
    assert plan["evaluation"]["compressed"]["accuracy"] >= 0 and (tmp_path / "c" / "compression_report.md").exists()
    assert len(plan["input_model_hash"]) == 64
    # recovery fine-tuning keeps the plan
    code, out, err = _run(capsys, "finetune", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
                          "--epochs", "1", *_data_args(toy_csv))
    assert code == 0, err
    assert "compressed model (recovery)" in out
    recovered = read_plan(tmp_path / "r")
    assert recovered["layers"] == plan["layers"] and recovered["recovery"]["config"]["epochs"] == 1
    assert recovered["input_model_hash"] == plan["input_model_hash"]


@pytest.mark.parametrize("method", ["svd-llm", "fisher-whitened"])
def test_compress_a_causal_lm_from_a_text_file(method, capsys, tmp_path, tiny_llama_dir, toy_text):
    code, out, err = _run(capsys, "compress", "--model", str(tiny_llama_dir), "--dataset", str(toy_text),
                          "--method", method, "--ratio", "0.5", "--allocation", "loss", "--max-length", "32",
                          "--fisher-samples", "8", "--fisher-batch-size", "4", "--fisher-cache", "none",
                          "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert f"**{method}**" in out and "loss allocation" in out and "eval perplexity: baseline" in out
    plan = read_plan(tmp_path / "c")
    assert plan["task"] == "causal-lm" and plan["calibration"]["num_examples"] == 8
    assert plan["calibration"]["kinds"] == (["fisher", "inputs"] if method == "fisher-whitened" else ["inputs"])
    assert set(plan["evaluation"]["compressed"]) >= {"perplexity", "loss"}
    from fwsvd_deploy import load_compressed

    model = load_compressed(tmp_path / "c")
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight is model.model.embed_tokens.weight


def _bad_cases(tiny_bert_dir, toy_csv, tmp_path):
    compressed = tmp_path / "already"
    compressed.mkdir()
    (compressed / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    (compressed / "compression.json").write_text(json.dumps({"format": "fwsvd-deploy/compressed-model"}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("sentence,sentiment\n")
    wrong_labels = tmp_path / "wrong.csv"
    wrong_labels.write_text("sentence,sentiment\ngood film,great\nbad film,terrible\n" * 10)
    model, data = ["--model", str(tiny_bert_dir)], _data_args(toy_csv)
    return {
        "missing model": (["compress", "--model", str(tmp_path / "nope"), *data], "does not exist"),
        "unknown hub id": (["compress", "--model", "no-such-org/no-such-model", *data], "cannot load"),
        "no target": (["compress", *model, "--targets", "does_not_exist", *data], "no module matched"),
        "rank zero": (["compress", *model, "--rank", "0", *data], "rank=0"),
        "rank multiple zero": (["compress", *model, "--rank-multiple", "0", *data], "rank_multiple=0"),
        "rank not a multiple": (["compress", *model, "--rank", "6", "--rank-multiple", "4", *data],
                                "not a multiple of rank_multiple=4"),
        "ratio above one": (["compress", *model, "--ratio", "1.5", *data], "ratio=1.5"),
        "ratio zero": (["compress", *model, "--ratio", "0", *data], "ratio=0"),
        "dataset missing": (["compress", *model, "--dataset", str(tmp_path / "none.csv")], "does not exist"),
        "dataset empty": (["compress", *model, "--dataset", str(empty_csv), "--text-column", "sentence",
                           "--label-column", "sentiment"], "no rows"),
        "column missing": (["compress", *model, "--dataset", str(toy_csv)], "no column"),
        "labels do not fit": (["compress", *model, "--dataset", str(wrong_labels), "--text-column", "sentence",
                               "--label-column", "sentiment"], "not in the model's labels"),
        "already compressed": (["compress", "--model", str(compressed), *data], "already compressed"),
        "output exists": (["compress", *model, *data], "not empty"),
        "bad override": (["compress", *model, "--rank-override", "query", *data], "NAME=RANK"),
        "finetune output exists": (["finetune", *model, *data], "not empty"),
    }, taken


CASES = ["missing model", "unknown hub id", "no target", "rank zero", "ratio above one", "ratio zero",
         "dataset missing", "dataset empty", "column missing", "labels do not fit", "already compressed",
         "output exists", "bad override", "finetune output exists"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(case, capsys, tmp_path, tiny_bert_dir, toy_csv):
    cases, taken = _bad_cases(tiny_bert_dir, toy_csv, tmp_path)
    argv, match = cases[case]
    out_dir = taken if "exists" in case else tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, *argv, "--out", str(out_dir), "--fisher-cache", "none") if argv[0] == "compress" \
        else _run(capsys, *argv, "--out", str(out_dir))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fwsvd-deploy: error:") and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folders
    assert (taken / "x").read_text() == "keep"


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--method", "pca"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fwsvd_deploy.cli", "compress", "--model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("fwsvd-deploy: error: model folder")


def test_recover_a_compressed_causal_lm(capsys, tmp_path, tiny_llama_dir, toy_text):
    code, out, err = _run(capsys, "compress", "--model", str(tiny_llama_dir), "--dataset", str(toy_text),
                          "--method", "svd", "--ratio", "0.4", "--max-length", "16", "--fisher-cache", "none",
                          "--out", str(tmp_path / "c"))
    assert code == 0, err
    code, out, err = _run(capsys, "finetune", "--model", str(tmp_path / "c"), "--dataset", str(toy_text),
                          "--max-length", "16", "--max-steps", "6", "--eval-steps", "3", "--batch-size", "8",
                          "--learning-rate", "3e-2", "--trainable", "factors", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "compressed model (recovery): 6 steps" in out and "perplexity before fine-tuning" in out
    plan = read_plan(tmp_path / "r")
    assert plan["layers"] == read_plan(tmp_path / "c")["layers"] and plan["task"] == "causal-lm"
    assert [h["step"] for h in plan["recovery"]["history"]] == [0, 3, 6]
    assert plan["recovery"]["eval"]["perplexity"] == min(h["eval_perplexity"] for h in plan["recovery"]["history"])
