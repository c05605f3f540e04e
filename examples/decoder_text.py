"""Compress a local decoder LM on a local text file from Python: `fwsvd-deploy run --config decoder-text.yaml`.

    python examples/decoder_text.py --model my-decoder --data notes.txt --out runs/my-decoder
    python examples/decoder_text.py ... --set compression.ratio=0.6

The ONNX candidate keeps the KV cache and loads in optimum's `ORTModelForCausalLM`. Exits 0 when the gate passes
and 1 when it fails, like the command line.
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
    parser.add_argument("--model", required=True, help="your causal LM: a folder, a hub id or a GGUF file")
    parser.add_argument("--data", required=True, help="a text file (documents separated by blank lines)")
    parser.add_argument("--out", required=True, help="a new folder for the run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one setting of examples/decoder-text.yaml (repeatable)")
    args = parser.parse_args(argv)

    settings = yaml.safe_load(Path(__file__).with_name("decoder-text.yaml").read_text())
    settings = apply_overrides(settings, [f"model={args.model}", f"data.dataset={args.data}", *args.set])
    cfg = PipelineConfig.from_dict(settings)

    result = run_pipeline(cfg, args.out)
    accuracy = result.validation.report["accuracy"]
    print(f"perplexity: baseline {accuracy['baseline']['perplexity']:.2f}, "
          f"candidate {accuracy['candidate']['perplexity']:.2f}")
    for check in result.validation.checks:
        print(f"  {'PASS' if check.passed else 'FAIL'} {check.name} = {check.value} "
              f"({check.comparison} {check.threshold:g})")
    print(f"optimised ONNX candidate: {result.candidate_dir}; report: {result.validation.out_dir / 'report.md'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
