"""Token-classification and question-answering validation: the metrics by hand, and whole runs on tiny models."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from conftest import tiny_encoder
from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model
from fwsvd_deploy.config import DataConfig, ExportConfig, GateConfig, OptimizeConfig, ValidateConfig
from fwsvd_deploy.errors import ConfigError, DatasetError
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.validators.report import SCHEMA
from fwsvd_deploy.validators.spans import normalize_answer, qa_metrics, span_f1, token_metrics
from fwsvd_deploy.validators.validate import validate

QUICK = ValidateConfig(latency=False, memory=False)


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert span_f1("the Eiffel tower", "Eiffel Tower") == 1.0
    assert span_f1("Eiffel", "Eiffel Tower") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert span_f1("Paris", "Eiffel Tower") == 0.0
    m = qa_metrics(["Paris", "in 1889"], [["paris", "Paris, France"], ["1889"]])
    assert m["exact_match"] == 0.5 and m["f1"] == pytest.approx((1.0 + 2 * 0.5 * 1.0 / 1.5) / 2)


def test_token_metrics_by_hand():
    pred = np.array([0, 1, 2, 0, 1])
    true = np.array([0, 1, 1, 0, 0])
    m = token_metrics(pred, true, outside=0)
    assert m["token_accuracy"] == pytest.approx(3 / 5)
    # non-O: predicted {1, 2, 4}, gold {1, 2}, correct {1} -> P 1/3, R 1/2
    assert m["token_f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def _graphs(tmp_path, tokenizer, task, labels=None):
    model = tiny_encoder("bert", task)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    out = {}
    save_model(model, tmp_path / "base", tokenizer)
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    save_compressed(model, tmp_path / "svd", tokenizer)
    for name in ("base", "svd"):
        export_onnx(tmp_path / name, ExportConfig(task=task), tmp_path / f"{name}-onnx")
        out[name] = optimize_onnx(tmp_path / f"{name}-onnx", OptimizeConfig(), tmp_path / f"{name}-opt").out_dir
    return out


def _word_predictions(folder, words, tokenizer):
    """Each word's predicted tag (its first sub-token's), computed here without the validator's code."""
    from fwsvd_deploy.exporters.runtime import make_session, run_session

    session = make_session(folder / "model.onnx")
    enc = tokenizer([words], is_split_into_words=True, return_tensors="np")
    feed = {i.name: enc[i.name].astype("int64") for i in session.get_inputs()}
    logits = run_session(session, feed)["logits"][0]
    first = {}
    for position, word in enumerate(enc.word_ids(0)):
        if word is not None and word not in first:
            first[word] = int(logits[position].argmax())
    return [first[i] for i in range(len(words))]


def test_token_classification_validation(tmp_path, tokenizer):
    graphs = _graphs(tmp_path, tokenizer, "token-classification", labels=["O", "B-FILM", "I-FILM"])
    words = ["I", "saw", "the", "grand", "budapest", "hotel"]
    rows = [{"tokens": words, "tags": ["O", "O", "O", "B-FILM", "I-FILM", "I-FILM"]}] * 12
    # two rows whose tags do not match their words are left out, and counted
    rows += [{"tokens": words, "tags": ["O", "O"]}] * 2
    path = tmp_path / "ner.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = DataConfig(dataset=str(path), text_column="tokens", label_column="tags", max_length=32, eval_fraction=0.5)
    result = validate(graphs["base"], graphs["svd"], data, QUICK, GateConfig(max_accuracy_drop=None), tmp_path / "r1")
    acc = result.report["accuracy"]
    assert acc["task"] == "token-classification" and acc["primary_metric"] == "token_accuracy"
    held_out = 7  # half of the 14 rows
    assert acc["examples"] + acc["skipped_examples"] == held_out and acc["examples"] >= 5
    assert {"token_accuracy", "token_macro_f1", "token_f1"} <= set(acc["baseline"])
    jsonschema.validate(result.report, SCHEMA)
    # every kept row is the same sentence: agreement is that of its six words, computed independently
    base, svd = (_word_predictions(graphs[n], words, tokenizer) for n in ("base", "svd"))
    assert acc["comparison"]["agreement"] == pytest.approx(np.mean([a == b for a, b in zip(base, svd, strict=True)]))
    tags = [0, 0, 0, 1, 2, 2]
    assert acc["baseline"]["token_accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(base, tags,
                                                                                               strict=True)]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"tokens": ["a"], "tags": ["B-PERSON"]}) for _ in range(4)))
    with pytest.raises(DatasetError, match="B-PERSON"):
        validate(graphs["base"], graphs["base"], DataConfig(dataset=str(bad), text_column="tokens",
                 label_column="tags", eval_fraction=0.5), QUICK, GateConfig(), tmp_path / "r3")
    none_match = tmp_path / "none.jsonl"
    none_match.write_text("\n".join(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) for _ in range(4)))
    with pytest.raises(DatasetError, match="none of 2 rows has one 'tags' entry per 'tokens' entry"):
        validate(graphs["base"], graphs["base"], DataConfig(dataset=str(none_match), text_column="tokens",
                 label_column="tags", eval_fraction=0.5), QUICK, GateConfig(), tmp_path / "r4")


def test_question_answering_validation(tmp_path, tokenizer):
    graphs = _graphs(tmp_path, tokenizer, "question-answering")
    context = "The film was shot in Görlitz, a town in Saxony, in early 2013."
    rows = [{"question": "Where was the film shot?", "context": context,
             "answers": {"text": ["Görlitz"], "answer_start": [21]}}] * 8
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    data = DataConfig(dataset=str(path), text_column="question", text_pair_column="context", label_column="answers",
                      max_length=48, eval_fraction=0.5)
    result = validate(graphs["base"], graphs["svd"], data, QUICK, GateConfig(max_accuracy_drop=None),
                      tmp_path / "r")
    acc = result.report["accuracy"]
    assert acc["task"] == "question-answering" and acc["primary_metric"] == "f1" and acc["examples"] == 4
    assert set(acc["baseline"]) == {"exact_match", "f1"}
    for side in ("baseline", "candidate"):  # four copies of one question: all right or all wrong, F1 >= EM
        assert acc[side]["exact_match"] in (0.0, 1.0) and acc[side]["f1"] >= acc[side]["exact_match"]
    jsonschema.validate(result.report, SCHEMA)
    with pytest.raises(ConfigError, match="text-pair-column"):
        validate(graphs["base"], graphs["base"], DataConfig(dataset=str(path), text_column="question",
                 label_column="answers"), QUICK, GateConfig(), tmp_path / "r2")


def test_best_span_stays_in_the_context_and_in_order():
    from fwsvd_deploy.validators.spans import _best_span

    start = np.zeros(12)
    end = np.zeros(12)
    start[[1, 5]] = [9.0, 3.0]  # the best start (1) is in the question, not the context
    end[[4, 7]] = [8.0, 2.0]  # an end before the start would score higher
    assert _best_span(start, end, context=[5, 6, 7, 8, 9], max_answer_tokens=30) == (5, 7)
    assert _best_span(start, end, context=[5, 6, 7, 8, 9], max_answer_tokens=2) == (5, 5)
