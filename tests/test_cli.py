"""The command line: the happy path on a tiny model; every bad input exits 2 with one line and writes nothing;
an internal error exits 3 with one line and a log; an interrupt exits 130, also during start-up imports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TOL, toy_data
from fwsvd_deploy.cli import main
from fwsvd_deploy.manifest import verify_manifest
from fwsvd_deploy.plan import read_plan


def _run(capsys, *argv):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _data_args(csv):
    return ["--dataset", str(csv), "--text-column", "sentence", "--label-column", "sentiment", "--max-length", "32"]


def test_finetune_compress_recover(capsys, tmp_path, tiny_bert_dir, toy_csv, tokenizer):
    code, out, err = _run(capsys, "finetune", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "ft"),
                          "--epochs", "1", *_data_args(toy_csv))
    assert code == 0, err
    assert "fine-tuned model" in out and "accuracy" in out
    code, out, err = _run(capsys, "compress", "--model", str(tmp_path / "ft"), "--out", str(tmp_path / "c"),
                          "--ratio", "0.5", "--fisher-axis", "output", "--qkv", "joint",
                          "--rank-multiple", "4", "--fisher-cache", str(tmp_path / "cache"), *_data_args(toy_csv))
    assert code == 0, err
    assert "eval accuracy: baseline" in out
    plan = read_plan(tmp_path / "c")
    # joint q/k/v: in each of the 2 blocks, key and value use the query's down-projection
    assert sum("shared_down" in v for v in plan["layers"].values()) == 4
    assert all(v["rank"] % 4 == 0 for v in plan["layers"].values())
    assert plan["calibration"]["num_examples"] == 72  # the 90% of the 80 rows that is not held out
    assert len(plan["input_model_hash"]) == 64 and (tmp_path / "c" / "compression_report.md").exists()
    # the recorded accuracy is that of the written model
    from fwsvd_deploy import DataConfig, evaluate, load_compressed, load_splits

    data = load_splits(DataConfig(dataset=str(toy_csv), text_column="sentence", label_column="sentiment",
                                  max_length=32)).eval
    from fwsvd_deploy.data import align_labels

    model = load_compressed(tmp_path / "c")
    data = align_labels(data, {"negative": 0, "positive": 1}, 2)
    recorded = plan["evaluation"]["compressed"]["accuracy"]
    assert evaluate(model, data, tokenizer, batch_size=32, max_length=32).accuracy == recorded
    assert plan["compression"]["qkv"] == "joint" and plan["compression"]["rank_multiple"] == 4
    assert plan["compression"]["fisher_axis"] == "output"
    # recovery fine-tuning keeps the plan
    code, out, err = _run(capsys, "finetune", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
                          "--epochs", "1", *_data_args(toy_csv))
    assert code == 0, err
    assert "compressed model (recovery)" in out
    recovered = read_plan(tmp_path / "r")
    assert recovered["layers"] == plan["layers"]
    assert recovered["input_model_hash"] == plan["input_model_hash"]
    # every folder carries a manifest whose content hash matches its files
    for name in ("ft", "c", "r"):
        assert verify_manifest(tmp_path / name) is None
    (tmp_path / "c" / "config.json").write_text((tmp_path / "c" / "config.json").read_text() + " ")
    assert "differ from the hash" in verify_manifest(tmp_path / "c")


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


# ---------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming what is wrong, nothing written, no input touched
# ---------------------------------------------------------------------------------------------------


def _copy_model(src, dst, *, drop=(), edit=None):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    if edit is not None:
        edit(dst)
    return dst


def _pickle_only(src, dst):
    from safetensors.torch import load_file

    _copy_model(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def _compressed(tiny_bert_dir, dst):
    from fwsvd_deploy import CompressionConfig, compress, load_classifier, load_tokenizer, save_compressed

    model = load_classifier(str(tiny_bert_dir))
    save_compressed(model, dst, load_tokenizer(str(tiny_bert_dir)),
                    report=compress(model, CompressionConfig(method="svd", ratio=0.5)))
    return dst


def _edit_plan(folder):
    plan = json.loads((folder / "compression.json").read_text())
    first = next(iter(plan["layers"]))
    plan["layers"][first]["rank"] += 1
    (folder / "compression.json").write_text(json.dumps(plan))


def _truncate(folder, name="model.safetensors"):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])


def _custom_code(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-model", architectures=["MyModel"], auto_map={"AutoConfig": "my.MyConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "my.py").write_text("raise SystemExit('remote code ran')\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# name -> (argv builder (model, csv, tmp) -> argv, the text the line must contain). A builder may create inputs
# under tmp/inputs; everything else under tmp must stay as it was.
BAD: dict = {
    "missing model": (lambda m, d, t: ["compress", "--model", str(t / "nope"), *d], "does not exist"),
    "unknown hub id": (lambda m, d, t: ["compress", "--model", "no-such-org/no-such-model", *d], "cannot load"),
    "no target": (lambda m, d, t: ["compress", "--model", m, "--targets", "does_not_exist", *d], "no module matched"),
    "regex target": (lambda m, d, t: ["compress", "--model", m, "--targets", "re:(", *d],
                     "target_modules='(' is not a valid regular expression"),
    "regex exclude": (lambda m, d, t: ["compress", "--model", m, "--exclude", "re:[", *d],
                      "exclude_modules='[' is not a valid regular expression"),
    "rank zero": (lambda m, d, t: ["compress", "--model", m, "--rank", "0", *d], "--rank 0 must be >= 1"),
    "rank multiple zero": (lambda m, d, t: ["compress", "--model", m, "--rank-multiple", "0", *d],
                           "--rank-multiple 0 must be >= 1"),
    "rank not a multiple": (lambda m, d, t: ["compress", "--model", m, "--rank", "6", "--rank-multiple", "4", *d],
                            "not a multiple of rank_multiple=4"),
    "rank saves nothing": (lambda m, d, t: ["compress", "--model", m, "--method", "svd", "--rank", "1000", *d],
                           "--rank 1000 saves no parameters in any targeted layer"),
    "loss floors beyond the budget": (lambda m, d, t: ["compress", "--model", m, "--method", "svd", "--allocation",
                                                       "loss", "--min-rank-fraction", "1.0", "--ratio", "0.01", *d],
                                      "the floor ranks alone keep"),
    "fisher allocation start beyond the budget": (lambda m, d, t: ["compress", "--model", m, "--method", "fwsvd",
                                                                  "--allocation", "fisher", "--rank-multiple", "16",
                                                                  "--ratio", "0.01", *d],
                                                  "rank 16 in every layer already keeps"),
    "whole budget to a greedy allocation": (lambda m, d, t: ["compress", "--model", m, "--method", "svd",
                                                            "--allocation", "loss", "--ratio", "1", *d],
                                            "--ratio 1.0 with allocation 'loss' buys every layer's exact weight"),
    "factors of a dense model": (lambda m, d, t: ["finetune", "--model", m, "--trainable", "factors", *d],
                                 "--trainable factors trains the factorised layers of a compressed model"),
    "ratio above one": (lambda m, d, t: ["compress", "--model", m, "--ratio", "1.5", *d], "--ratio 1.5"),
    "ratio zero": (lambda m, d, t: ["compress", "--model", m, "--ratio", "0", *d], "--ratio 0"),
    "max length beyond positions": (lambda m, d, t: ["compress", "--model", m, *d[:-2], "--max-length", "512"],
                                    "max_length 512 is longer than the 128 positions"),
    "dataset missing": (lambda m, d, t: ["compress", "--model", m, "--dataset", str(t / "none.csv")],
                        "does not exist"),
    "dataset empty": (lambda m, d, t: ["compress", "--model", m, "--dataset", str(_write(t / "inputs" / "e.csv",
                                       "sentence,sentiment\n")), "--text-column", "sentence",
                                       "--label-column", "sentiment"], "no rows"),
    "column missing": (lambda m, d, t: ["compress", "--model", m, "--dataset", d[1]], "no column"),
    "labels do not fit": (lambda m, d, t: ["compress", "--model", m, "--dataset", str(_write(
        t / "inputs" / "w.csv", "sentence,sentiment\n" + "good film,great\nbad film,terrible\n" * 10)),
        "--text-column", "sentence", "--label-column", "sentiment"], "not in the model's labels"),
    "already compressed": (lambda m, d, t: ["compress", "--model", str(_compressed(m, t / "inputs" / "c")), *d],
                           "already compressed"),
    "output exists": (lambda m, d, t: ["compress", "--model", m, *d, "--out", str(_taken(t))], "not empty"),
    "output is a file": (lambda m, d, t: ["compress", "--model", m, *d, "--out", d[1]], "is a file"),
    "output parent is a file": (lambda m, d, t: ["compress", "--model", m, *d, "--out",
                                                 str(_write(t / "inputs" / "a-file", "x") / "out")],
                                "is a file, not a folder"),
    "output not writable": (lambda m, d, t: ["compress", "--model", m, *d, "--out", "/proc/fwsvd-deploy-test"],
                            "cannot write output folder"),
    "output is the model": (lambda m, d, t: ["compress", "--model", str(_copy_model(m, t / "inputs" / "m")),
                                             *d, "--out", str(t / "inputs" / "m"), "--overwrite"],
                            "is the input"),
    "output inside the model": (lambda m, d, t: ["finetune", "--model", str(_copy_model(m, t / "inputs" / "m")),
                                                 *d, "--out", str(t / "inputs" / "m" / "sub")], "is inside the input"),
    "bad override": (lambda m, d, t: ["compress", "--model", m, "--rank-override", "query", *d], "NAME=RANK"),
    "fisher cache is a file": (lambda m, d, t: ["compress", "--model", m, *d, "--fisher-cache", d[1]],
                               "is not a folder"),
    "pickle-only weights": (lambda m, d, t: ["compress", "--model", str(_pickle_only(m, t / "inputs" / "p")), *d],
                            "pickled weights (pytorch_model.bin)"),
    "no tokenizer files": (lambda m, d, t: ["compress", "--model", str(_copy_model(
        m, t / "inputs" / "n", drop=TOKENIZER_FILES)), *d], "has no tokenizer files"),
    "corrupt config": (lambda m, d, t: ["finetune", "--model", str(_copy_model(
        m, t / "inputs" / "cc", edit=lambda f: _write(f / "config.json", "{oops"))), *d], "config.json: Expecting"),
    "finetune output exists": (lambda m, d, t: ["finetune", "--model", m, *d, "--out", str(_taken(t))], "not empty"),
    "export hub id": (lambda m, d, t: ["export", "--model", "no-such-org/no-such-model"], "hub could not provide"),
    "export corrupt config": (lambda m, d, t: ["export", "--model", str(_copy_model(
        m, t / "inputs" / "cc", edit=lambda f: _write(f / "config.json", "{oops")))], "config.json: Expecting"),
    "export custom code": (lambda m, d, t: ["export", "--model", str(_copy_model(
        m, t / "inputs" / "x", edit=_custom_code))], "never runs code shipped with a model"),
    "export truncated weights": (lambda m, d, t: ["export", "--model", str(_copy_model(
        m, t / "inputs" / "tr", edit=_truncate))], "cannot load"),
    "export plan disagrees": (lambda m, d, t: ["export", "--model", str(_edit(_compressed(
        m, t / "inputs" / "c"), _edit_plan))], "weights do not match the plan"),
    "export compressed, truncated": (lambda m, d, t: ["export", "--model", str(_edit(_compressed(
        m, t / "inputs" / "c"), _truncate))], "the file is truncated or not safetensors"),
    "export pickle-only": (lambda m, d, t: ["export", "--model", str(_pickle_only(m, t / "inputs" / "p"))],
                           "--allow-pickle"),
    "export no tokenizer": (lambda m, d, t: ["export", "--model", str(_copy_model(
        m, t / "inputs" / "n", drop=TOKENIZER_FILES))], "has no tokenizer files"),
    "export output is the model": (lambda m, d, t: ["export", "--model", str(_copy_model(m, t / "inputs" / "m")),
                                                    "--out", str(t / "inputs" / "m"), "--overwrite"], "is the input"),
    "optimize not an export": (lambda m, d, t: ["optimize", "--onnx", m], "has no model.onnx"),
    "validate parity windows": (lambda m, d, t: ["validate", "--baseline", m, "--candidate", m, *d,
                                                 "--parity-windows", "0"], "--parity-windows 0 must be >= 1"),
}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _edit(folder, edit):
    edit(folder)
    return folder


def _taken(tmp_path):
    taken = tmp_path / "inputs" / "taken"
    taken.mkdir(parents=True, exist_ok=True)
    (taken / "x").write_text("keep")
    return taken


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, capsys, tmp_path, tiny_bert_dir, toy_csv,
                                                      monkeypatch):
    build, match = BAD[case]
    argv = build(str(tiny_bert_dir), _data_args(toy_csv), tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if argv[0] == "compress" and "--fisher-cache" not in argv:
        argv += ["--fisher-cache", "none"]
    before, model_before = _tree(tmp_path), _tree(tiny_bert_dir)
    # no case may reach for the network: offline mode is set (conftest), and a connection attempt fails the test
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"{case} tried to open a connection: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    code, out, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fwsvd-deploy: error:") and match in lines[0], err
    assert _tree(tmp_path) == before  # nothing written, no temporary folders, inputs untouched
    assert _tree(tiny_bert_dir) == model_before


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--method", "pca"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_choices_and_defaults_come_from_the_configs(monkeypatch, capsys):
    """A method appended to the config's list is offered by the command line without touching it."""
    from fwsvd_deploy import cli, config

    monkeypatch.setattr(cli, "METHODS", (*config.METHODS, "new-method"))
    parser = cli.build_parser()
    args = parser.parse_args(["compress", "--model", "m", "--out", "o", "--method", "new-method"])
    assert args.method == "new-method"
    args = parser.parse_args(["validate", "--baseline", "b", "--candidate", "c", "--out", "o"])
    assert args.eval_batch_size == config.ValidateConfig().eval_batch_size
    # resolved by the models' kind: GateConfig's default for encoders, none for causal LMs (they have no accuracy)
    assert args.max_accuracy_drop is None and str(config.GateConfig().max_accuracy_drop) in parser.format_help() + \
        cli.build_parser()._subparsers._group_actions[0].choices["validate"].format_help()
    assert args.seq_lens == ",".join(map(str, config.ValidateConfig().seq_lens))


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fwsvd_deploy.cli", "compress", "--model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
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


# ---------------------------------------------------------------------------------------------------
# Internal errors and interrupts
# ---------------------------------------------------------------------------------------------------


def test_internal_error_is_one_line_exit_3_with_the_traceback_in_a_log(monkeypatch, capsys, tmp_path):
    from fwsvd_deploy import cli

    def broken(args):
        raise KeyError("an unforeseen key")

    monkeypatch.setenv("FWSVD_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cli._COMMANDS, "bench", broken)
    code = main(["bench", "--model", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1
    assert err[0].startswith("fwsvd-deploy: internal error: KeyError: 'an unforeseen key' (full traceback in ")
    log = next((tmp_path / "cache" / "logs").glob("fwsvd-deploy-error-*.log"))
    assert "Traceback" in log.read_text() and "def broken" not in err[0] and "broken" in log.read_text()
    assert main(["--debug", "bench", "--model", "x"]) == 3
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_empty_error_message_still_gives_one_line(monkeypatch, capsys):
    from fwsvd_deploy import cli
    from fwsvd_deploy.errors import ExportError

    def empty(args):
        raise ExportError("")

    monkeypatch.setitem(cli._COMMANDS, "bench", empty)
    assert main(["bench", "--model", "x"]) == 2
    assert capsys.readouterr().err == "fwsvd-deploy: error: ExportError\n"


class _InterruptImport:
    """A meta-path finder that interrupts the import of one module, as Ctrl-C during start-up would."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise KeyboardInterrupt
        return None


def test_interrupt_during_imports_exits_130(monkeypatch, capsys, tmp_path):
    monkeypatch.delitem(sys.modules, "fwsvd_deploy.pipeline", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport("fwsvd_deploy.pipeline"), *sys.meta_path])
    code = main(["finetune", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("library", ["swallows", "wraps"])
def test_a_ctrl_c_that_library_code_swallows_or_wraps_still_exits_130(monkeypatch, capsys, library):
    """An exception raised in ``__del__`` or a callback is only printed; some code re-raises it as another type."""
    from fwsvd_deploy import cli

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt as exc:
            if library == "wraps":
                raise RuntimeError("worker failed") from exc
        return 0

    monkeypatch.setitem(cli._COMMANDS, "bench", command)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, not in a background job
    try:
        assert main(["bench", "--model", "x"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "internal error" not in err


def test_an_ignored_sigint_stays_ignored(monkeypatch, capsys):
    """Under nohup or in a background job SIGINT is ignored: main must not start catching it."""
    from fwsvd_deploy import cli

    seen = []
    monkeypatch.setitem(cli._COMMANDS, "bench", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["bench", "--model", "x"]) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_command_line_imports_nothing_heavy_before_main():
    code = "import sys, fwsvd_deploy.cli; print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_ctrl_c_of_a_running_command_exits_130(tmp_path, tiny_bert_dir, toy_csv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a shell's background job starts with SIGINT ignored, and so would the command: give it a terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "fwsvd_deploy.cli", "--quiet", "compress", "--model",
                             str(tiny_bert_dir), "--out", str(tmp_path / "o"), "--fisher-cache", "none",
                             *_data_args(toy_csv)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(1.5)  # inside main by now: importing torch, loading, or computing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("fwsvd-deploy: interrupted")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


# ---------------------------------------------------------------------------------------------------
# What the data and the model allow, checked on real inputs
# ---------------------------------------------------------------------------------------------------


def test_rows_with_empty_text_or_label_are_counted(capsys, tmp_path, tiny_bert_dir):
    rows = ["sentence,sentiment"] + [f"good film {i},positive" for i in range(20)] + \
           [f"bad film {i},negative" for i in range(20)] + [",negative", "   ,positive", "odd film,"]
    (tmp_path / "gaps.csv").write_text("\n".join(rows) + "\n")
    code, _, err = _run(capsys, "finetune", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "o"),
                        "--epochs", "1", "--dataset", str(tmp_path / "gaps.csv"), "--text-column", "sentence",
                        "--label-column", "sentiment", "--max-length", "16", "--eval-fraction", "0.2")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("fwsvd-deploy: warning:")]
    # the hold-out is drawn first, so the 3 incomplete rows fall on either side of it
    import re

    counts = [int(m.group(1)) for line in warnings if (m := re.search(r": (\d+) of \d+ rows dropped", line))]
    assert sum(counts) == 3


def test_long_texts_fit_any_max_length_the_model_allows(capsys, tmp_path, tiny_bert_dir):
    """At the model's limit the longest reviews run; one more token is refused before anything runs."""
    d = toy_data(40)
    long_texts = [" ".join([t] * 40) for t in d.texts]  # far beyond 128 tokens
    import pandas as pd

    pd.DataFrame({"sentence": long_texts, "sentiment": [d.label_names[y] for y in d.labels]}).to_csv(
        tmp_path / "long.csv", index=False)
    args = ["--model", str(tiny_bert_dir), "--epochs", "1", "--dataset", str(tmp_path / "long.csv"),
            "--text-column", "sentence", "--label-column", "sentiment"]
    code, _, err = _run(capsys, "finetune", *args, "--out", str(tmp_path / "a"), "--max-length", "128")
    assert code == 0, err
    code, _, err = _run(capsys, "finetune", *args, "--out", str(tmp_path / "b"), "--max-length", "129")
    assert code == 2 and "max_length 129 is longer than the 128 positions" in err
    assert not (tmp_path / "b").exists()


def test_pickle_only_weights_load_when_allowed(capsys, tmp_path, tiny_bert_dir, toy_csv, tokenizer):
    folder = _pickle_only(tiny_bert_dir, tmp_path / "p")
    code, _, err = _run(capsys, "export", "--model", str(folder), "--out", str(tmp_path / "o"), "--allow-pickle")
    assert code == 0, err
    from fwsvd_deploy.exporters.runtime import make_session, parity_inputs, run_session
    from fwsvd_deploy.modeling import load_classifier

    session = make_session(tmp_path / "o" / "model.onnx")
    inputs = parity_inputs(tokenizer, [i.name for i in session.get_inputs()], 2, 12)
    dense = load_classifier(str(tiny_bert_dir))
    with torch.no_grad():
        want = dense(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    assert abs(run_session(session, inputs)["logits"] - want).max() <= TOL["onnx_vs_torch"]


def test_the_vocabulary_bounds_the_synthetic_inputs(capsys, tmp_path):
    """A model with a small vocabulary is timed with its own ids (ids beyond it would fail in Gather)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from fwsvd_deploy import save_model
    from fwsvd_deploy.config import ExportConfig
    from fwsvd_deploy.exporters import export_onnx

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(295))]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    small = BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=64))
    save_model(small, tmp_path / "small", tokenizer)
    export_onnx(tmp_path / "small", ExportConfig(), tmp_path / "small-onnx")
    code, out, err = _run(capsys, "bench", "--model", str(tmp_path / "small-onnx"), "--batch-sizes", "1",
                          "--seq-lens", "8", "--rounds", "1", "--warmup", "0", "--threads", "1")
    assert code == 0, err
    assert "| 1 x 8 |" in out


@pytest.mark.parametrize(("message", "argv", "expected"), [
    ("rank_multiple=0 must be >= 1", ["compress", "--rank-multiple", "0"], "--rank-multiple 0 must be >= 1"),
    ("ratio=1.5 must be in (0.0, 1.0]", ["compress", "--ratio=1.5"], "--ratio 1.5 must be in (0.0, 1.0]"),
    # from a YAML file, or a setting whose flag has another name: the setting's own name stays
    ("ratio=1.5 must be in (0.0, 1.0]", ["run", "--config", "p.yaml"], "ratio=1.5 must be in (0.0, 1.0]"),
    ("target_modules='(' is not a valid regular expression", ["compress", "--targets", "re:("],
     "target_modules='(' is not a valid regular expression"),
    ("no module matched", ["compress", "--rank", "0"], "no module matched"),
])
def test_a_setting_given_as_a_flag_is_named_by_its_flag(message, argv, expected):
    from fwsvd_deploy.cli import _name_the_flag

    assert _name_the_flag(message, argv) == expected
