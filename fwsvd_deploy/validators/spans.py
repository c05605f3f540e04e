"""Token-classification and extractive question-answering evaluation of ONNX models through ONNX Runtime.

Token classification: each word is labelled by its first sub-token; metrics are word accuracy, macro-F1 over tags
and micro-F1 over the tags other than ``O``. Question answering: the best span (start <= end, at most
``max_answer_tokens`` long, inside the context) is read back through the tokenizer's offsets; metrics are
SQuAD-style exact match and F1 against every gold answer.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..exporters.runtime import ONNX_FILE, make_session, run_session
from ..modeling import load_tokenizer
from ..progress import progress_bar
from .metrics import classification_metrics

_PUNCTUATION = frozenset(string.punctuation)

# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def span_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1, each the best over an example's gold answers, averaged."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gold) for p, gold in
          zip(predictions, answers, strict=True)]
    f1 = [max(span_f1(p, g) for g in gold) for p, gold in zip(predictions, answers, strict=True)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


def token_metrics(pred: np.ndarray, true: np.ndarray, outside: int | None) -> dict[str, float]:
    """Word accuracy, macro-F1 over tags, and micro-F1 over the tags other than ``outside`` (``O``)."""
    base = classification_metrics(pred, true)
    out = {"token_accuracy": base["accuracy"], "token_macro_f1": base["macro_f1"]}
    if outside is not None:
        predicted = pred != outside
        gold = true != outside
        hit = float(np.sum((pred == true) & gold))
        precision = hit / max(float(predicted.sum()), 1.0)
        recall = hit / max(float(gold.sum()), 1.0)
        out["token_f1"] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def _tag_ids(tags: Sequence[Any], label2id: Mapping[str, int], num_labels: int, source: str) -> list[int]:
    out = []
    for tag in tags:
        if isinstance(tag, str):
            if tag not in label2id:
                raise DatasetError(f"{source}: tag {tag!r} is not among the model's labels {sorted(label2id)}")
            out.append(int(label2id[tag]))
        else:
            value = int(tag)
            if not 0 <= value < num_labels:
                raise DatasetError(f"{source}: tag id {value} does not fit the model's {num_labels} labels")
            out.append(value)
    return out


def matching_tag_rows(rows: list[dict[str, Any]], words_col: str, tags_col: str) -> tuple[list[dict[str, Any]], int]:
    """The rows with one tag per word, and how many others were left out (with a warning that counts them).

    Raises:
        DatasetError: when no row has as many tags as words.
    """
    kept = [r for r in rows if _length(r[words_col]) is not None and _length(r[words_col]) == _length(r[tags_col])]
    skipped = len(rows) - len(kept)
    if not kept:
        raise DatasetError(f"none of {len(rows)} rows has one {tags_col!r} entry per {words_col!r} entry; each row "
                           "needs a list of words and a list of as many tags")
    if skipped:
        logging.getLogger("fwsvd_deploy").warning("%d of %d token-classification rows left out: their %s and %s "
                                                  "differ in length", skipped, len(rows), words_col, tags_col)
    return kept, skipped


def _length(value: Any) -> int | None:
    return None if isinstance(value, str) or not hasattr(value, "__len__") else len(value)


def evaluate_tokens(folder: Path, rows: list[dict[str, Any]], words_col: str, tags_col: str, config: dict[str, Any],
                    *, device: str, batch_size: int, max_length: int, threads: int | None,
                    progress: bool | None) -> dict[str, Any]:
    """Per-word predictions of a token-classification graph, its metrics, and its per-word logits."""
    session = make_session(folder / ONNX_FILE, device, threads=threads)
    tokenizer = load_tokenizer(str(folder))
    label2id = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    preds, golds, word_logits = [], [], []
    for start in progress_bar(range(0, len(rows), batch_size), progress=progress, desc=f"Evaluate {folder.name}",
                              unit="batch", leave=False):
        chunk = rows[start:start + batch_size]
        words = [[str(w) for w in r[words_col]] for r in chunk]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                        return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items()}
        logits = run_session(session, feed)["logits"]
        for i, row in enumerate(chunk):
            tags = _tag_ids(list(row[tags_col]), label2id, num_labels, str(folder))
            seen: set[int] = set()
            for position, word in enumerate(enc.word_ids(i)):
                if word is None or word in seen or word >= len(tags):
                    continue
                seen.add(word)
                preds.append(int(logits[i, position].argmax()))
                golds.append(tags[word])
                word_logits.append(logits[i, position].astype(np.float32))
    if not golds:
        raise DatasetError("no word survived tokenisation; check --max-length and the tokens column")
    outside = label2id.get("O")
    metrics = token_metrics(np.asarray(preds), np.asarray(golds), outside)
    return {"metrics": metrics, "predictions": preds, "logits": np.stack(word_logits), "primary": "token_accuracy"}


def _best_span(start: np.ndarray, end: np.ndarray, context: list[int], max_answer_tokens: int) -> tuple[int, int]:
    best, span = -np.inf, (context[0], context[0])
    allowed = set(context)
    for i in context:
        for j in range(i, min(i + max_answer_tokens, len(end))):
            if j not in allowed:
                break
            score = start[i] + end[j]
            if score > best:
                best, span = score, (i, j)
    return span


def evaluate_qa(folder: Path, rows: list[dict[str, Any]], question_col: str, context_col: str, answers_col: str,
                *, device: str, batch_size: int, max_length: int, threads: int | None, progress: bool | None,
                max_answer_tokens: int = 30) -> dict[str, Any]:
    """Predicted answer spans of an extractive QA graph, EM/F1, and start/end logits on real tokens."""
    session = make_session(folder / ONNX_FILE, device, threads=threads)
    tokenizer = load_tokenizer(str(folder))
    predictions, golds, flat = [], [], []
    for start in progress_bar(range(0, len(rows), batch_size), progress=progress, desc=f"Evaluate {folder.name}",
                              unit="batch", leave=False):
        chunk = rows[start:start + batch_size]
        questions = [str(r[question_col]) for r in chunk]
        contexts = [str(r[context_col]) for r in chunk]
        enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, padding=True,
                        return_offsets_mapping=True, return_tensors="np")
        offsets = enc.pop("offset_mapping")
        out = run_session(session, {k: v.astype(np.int64) for k, v in enc.items()})
        for i, row in enumerate(chunk):
            context_tokens = [t for t, s in enumerate(enc.sequence_ids(i)) if s == 1]
            if not context_tokens:
                raise DatasetError("a context was truncated away entirely; raise --max-length")
            a, b = _best_span(out["start_logits"][i], out["end_logits"][i], context_tokens, max_answer_tokens)
            predictions.append(contexts[i][int(offsets[i][a][0]):int(offsets[i][b][1])])
            golds.append(_answers(row[answers_col]))
            mask = enc["attention_mask"][i].astype(bool)
            flat.append(np.concatenate([out["start_logits"][i][mask], out["end_logits"][i][mask]]))
    return {"metrics": qa_metrics(predictions, golds), "predictions": predictions, "logits": flat, "primary": "f1"}


def _answers(value: Any) -> list[str]:
    """Gold answers from SQuAD's ``{"text": [...], "answer_start": [...]}``, a list of strings, or a string."""
    if isinstance(value, Mapping):
        texts = value.get("text")
        texts = list(texts) if texts is not None and not isinstance(texts, str) else [texts]
    elif isinstance(value, str):
        texts = [value]
    else:
        texts = list(value)
    texts = [str(t) for t in texts if t is not None]
    if not texts:
        raise DatasetError("an example has no gold answer text")
    return texts
