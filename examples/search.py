"""Find the most compression that passes the gate, from Python: `fwsvd-deploy search --config search.yaml`.

    python examples/search.py --model my-classifier --data reviews.csv --out runs/search --low 0.2 --high 0.8

Each trial is a whole pipeline run at one kept fraction; the baseline's stages are shared. Exits 0 with the best
passing kept fraction (its candidate copied to OUT/best), 1 when none passes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from fwsvd_deploy.config import PipelineConfig, SearchConfig, apply_overrides
from fwsvd_deploy.pipeline import search_ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="your fine-tuned classifier: a folder or a hub id")
    parser.add_argument("--data", required=True, help="a CSV with `text` and `label` columns")
    parser.add_argument("--out", required=True, help="a new folder for the search")
    parser.add_argument("--low", type=float, default=0.2, help="smallest kept fraction tried")
    parser.add_argument("--high", type=float, default=0.8, help="largest kept fraction tried")
    parser.add_argument("--steps", type=int, default=3, help="bisection steps after both ends")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting of examples/search.yaml (repeatable)")
    args = parser.parse_args(argv)

    settings = yaml.safe_load(Path(__file__).with_name("search.yaml").read_text())
    settings = apply_overrides(settings, [f"model={args.model}", f"data.dataset={args.data}", *args.set])
    cfg = PipelineConfig.from_dict(settings)

    result = search_ratio(cfg, args.out, SearchConfig(low=args.low, high=args.high, steps=args.steps))
    for trial in result.trials:
        verdict = "pass" if trial.passed else "fail: " + ", ".join(trial.failed_checks)
        print(f"  keep {trial.ratio}: {trial.metric} {trial.metric_candidate:.4f} "
              f"(baseline {trial.metric_baseline:.4f}) {verdict}")
    if result.best_ratio is None:
        print(f"no kept fraction in [{args.low}, {args.high}] passes the gate")
        return 1
    print(f"best kept fraction {result.best_ratio}; candidate in {result.best_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
