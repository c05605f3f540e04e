"""FWSVD against a plain reference implementation, on the same fine-tuned MiniLM, examples and ranks.

The reference is written from the paper with nothing shared with the package: the Fisher from one backward pass
per example (batch of one, so no padding at all) accumulated in float64, the SVD of ``diag(a) W diag(b)`` in float64,
uniform ranks ``floor(R m n / (m + n))``, and the dense weight replaced by its reconstruction. The package's
``collect_fisher`` + ``compress`` run on the same examples. Both are evaluated on the task's test split.

    python benchmarks/fwsvd_reference.py --task convention-party --ratios 0.5,0.3

Prints the per-layer relative difference of the two Fisher estimates and both accuracies; writes
benchmarks/results/fwsvd_reference.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from fwsvd_deploy import CompressionConfig, collect_fisher, compress, evaluate
from fwsvd_deploy.config import CalibrationConfig
from fwsvd_deploy.modeling import package_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import HERE, TRAINING, baseline_model  # noqa: E402


def reference_fisher(model, data, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Sum over examples of the squared gradient of each example's loss, one backward per example (float64)."""
    from fwsvd_deploy.compression import resolve_targets

    targets = {t.name: t.module for t in resolve_targets(model)}
    sums = {name: torch.zeros_like(m.weight, dtype=torch.float64) for name, m in targets.items()}
    model.eval()
    for text, label in zip(data.texts, data.labels, strict=True):
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        model.zero_grad()
        logits = model(**enc).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([label])).backward()
        for name, m in targets.items():
            sums[name] += m.weight.grad.double().square()
    model.zero_grad()
    return sums


def reference_fwsvd(model, fisher: dict[str, torch.Tensor], ratio: float) -> None:
    """Replace each targeted weight by its rank-r FWSVD reconstruction (axis both), in place."""
    for name, f in fisher.items():
        module = model.get_submodule(name)
        w = module.weight.detach().double()
        m, n = w.shape
        rank = math.floor(ratio * m * n / (m + n))
        a, b = f.sum(1).sqrt(), f.sum(0).sqrt()
        a, b = a.clamp_min(a.max() * 1e-6), b.clamp_min(b.max() * 1e-6)
        u, s, vh = torch.linalg.svd(a[:, None] * w * b[None, :], full_matrices=False)
        approx = ((u[:, :rank] * s[:rank]) / a[:, None]) @ (vh[:rank] / b[None, :])
        with torch.no_grad():
            module.weight.copy_(approx.to(module.weight.dtype))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="convention-party")
    p.add_argument("--ratios", default="0.5,0.3")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--work", default=str(HERE.parent / ".cache" / "bench"))
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    base, tokenizer, splits = baseline_model(a.task, Path(a.work))
    a.max_length = TRAINING[a.task][2]
    sample = splits.train.sample(a.samples, seed=0)
    start = time.perf_counter()
    ref = reference_fisher(copy.deepcopy(base), sample, tokenizer, a.max_length)
    ref_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = collect_fisher(base, splits.train, tokenizer, CalibrationConfig(num_samples=a.samples),
                          max_length=a.max_length, seed=0)
    ours_seconds = time.perf_counter() - start
    diffs = {n: float((ours.fisher[n].double() - f).norm() / f.norm()) for n, f in ref.items()}
    print(f"Fisher: largest per-layer relative difference {max(diffs.values()):.2e} "
          f"(reference {ref_seconds:.0f} s, package {ours_seconds:.0f} s)", flush=True)
    baseline = evaluate(base, splits.eval, tokenizer, max_length=a.max_length).accuracy
    rows = []
    for ratio in (float(r) for r in a.ratios.split(",")):
        reference = copy.deepcopy(base)
        reference_fwsvd(reference, ref, ratio)
        package = copy.deepcopy(base)
        compress(package, CompressionConfig(method="fwsvd", fisher_axis="both", ratio=ratio), ours)
        row = {"ratio": ratio,
               "reference": evaluate(reference, splits.eval, tokenizer, max_length=a.max_length).accuracy,
               "package": evaluate(package, splits.eval, tokenizer, max_length=a.max_length).accuracy}
        rows.append(row)
        print(row, flush=True)
    result = {"benchmark": "fwsvd_reference", "task": a.task, "samples": a.samples, "max_length": a.max_length,
              "baseline_accuracy": baseline, "eval_examples": len(splits.eval),
              "fisher_max_relative_difference": max(diffs.values()), "rows": rows, "versions": package_versions()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fwsvd_reference-{a.task}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
