"""Compress a local classifier on a local CSV from Python: what `fwsvd-deploy run --config encoder-csv.yaml` does.

    python examples/encoder_csv.py --model my-classifier --data reviews.csv --out runs/my-encoder
    python examples/encoder_csv.py ... --set compression.ratio=0.3 --set recovery.enabled=false

Exits 0 when the gate passes and 1 when it fails, like the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from fwsvd_deploy.config import PipelineConfig, apply_overrides
from fwsvd_deploy.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="your fine-tuned classifier: a folder or a hub id")
    parser.add_argument("--data", required=True, help="a CSV with `text` and `label` columns")
    parser.add_argument("--out", required=True, help="a new folder for the run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting of examples/encoder-csv.yaml (repeatable)")
    args = parser.parse_args(argv)

    settings = yaml.safe_load(Path(__file__).with_name("encoder-csv.yaml").read_text())
    settings = apply_overrides(settings, [f"model={args.model}", f"data.dataset={args.data}", *args.set])
    cfg = PipelineConfig.from_dict(settings)

    result = run_pipeline(cfg, args.out)
    accuracy = result.validation.report["accuracy"]
    print(f"accuracy: baseline {accuracy['baseline']['accuracy']:.4f}, "
          f"candidate {accuracy['candidate']['accuracy']:.4f}")
    for check in result.validation.checks:
        print(f"  {'PASS' if check.passed else 'FAIL'} {check.name} = {check.value} "
              f"({check.comparison} {check.threshold:g})")
    print(f"optimised ONNX candidate: {result.candidate_dir}; report: {result.validation.out_dir / 'report.md'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
