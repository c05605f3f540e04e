"""The real thing: all-MiniLM-L6-v2 fine-tuned briefly on real Rotten Tomatoes reviews.

The fine-tuned model is cached (``FWSVD_TEST_CACHE``, default ``.cache/tests`` in the checkout), so only
the first run pays for the fine-tuning (about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest

from fwsvd_deploy import (
    CompressionConfig,
    DataConfig,
    FinetuneConfig,
    FisherConfig,
    collect_fisher,
    compress,
    evaluate,
    finetune,
    load_classifier,
    load_splits,
    load_tokenizer,
    save_model,
)
from fwsvd_deploy.modeling import EMBEDDED_MODEL

pytestmark = pytest.mark.slow

DATA = DataConfig(dataset="rotten_tomatoes", eval_split="test", max_length=64, max_train_samples=2000,
                  max_eval_samples=500)
FINETUNE = FinetuneConfig(epochs=1, learning_rate=5e-5, batch_size=32)
CACHE = Path(os.environ.get("FWSVD_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "tests"))


@pytest.fixture(scope="module")
def minilm():
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    splits = load_splits(DATA)
    key = hashlib.sha256(json.dumps([DATA.to_dict(), FINETUNE.to_dict()], sort_keys=True).encode()).hexdigest()[:16]
    folder = CACHE / f"minilm-rt-{key}"
    if not (folder / "config.json").is_file():
        model = load_classifier(EMBEDDED_MODEL, label_names=splits.label_names)
        finetune(model, splits.train, tokenizer, FINETUNE, max_length=DATA.max_length, progress=False)
        save_model(model, folder, tokenizer, overwrite=True)
    model = load_classifier(str(folder))
    base = evaluate(model, splits.eval, tokenizer, max_length=DATA.max_length).accuracy
    fisher = collect_fisher(model, splits.train, tokenizer, FisherConfig(num_samples=256),
                            max_length=DATA.max_length, progress=False)
    return model, tokenizer, splits, base, fisher


def _accuracy(minilm, cfg: CompressionConfig) -> float:
    model, tokenizer, splits, _, fisher = minilm
    candidate = copy.deepcopy(model)
    compress(candidate, cfg, fisher)
    return evaluate(candidate, splits.eval, tokenizer, max_length=DATA.max_length).accuracy


def test_baseline_learned_the_task(minilm):
    assert minilm[3] > 0.65  # two balanced-ish classes; a head that learned nothing sits near 0.57


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_fwsvd_beats_svd_without_finetuning(minilm, ratio):
    svd = _accuracy(minilm, CompressionConfig(method="svd", ratio=ratio))
    fwsvd = _accuracy(minilm, CompressionConfig(method="fwsvd", fisher_axis="both", ratio=ratio))
    print(f"ratio {ratio}: baseline {minilm[3]:.4f} svd {svd:.4f} fwsvd {fwsvd:.4f}")
    assert fwsvd > svd
    assert fwsvd > minilm[3] - 0.10
