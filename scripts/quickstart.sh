#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then `fwsvd-deploy run` — the real all-MiniLM-L6-v2
# fine-tuned on real Rotten Tomatoes reviews, compressed to half of its block parameters (fisher-whitened, loss allocation),
# recovery-fine-tuned for one epoch, exported to ONNX, optimised with ONNX Runtime, and validated against the
# optimised baseline (accuracy, latency, memory) with the release gate. Stages are cached under runs/pipeline.
# Extra arguments go to `fwsvd-deploy run` (e.g. --config my.yaml, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fwsvd-deploy run --out "${RUNS:-runs}/pipeline" "$@"
