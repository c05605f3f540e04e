#!/usr/bin/env bash
# The main job on the embedded default: the real all-MiniLM-L6-v2 fine-tuned on real Rotten Tomatoes reviews,
# compressed to half its block parameters with FWSVD and with plain SVD, then recovery-fine-tuned.
# Outputs go to runs/ (override with RUNS=...). The fine-tuned baseline is kept and reused on later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
runs=${RUNS:-runs}
cli=.venv/bin/fwsvd-deploy
data=(--dataset rotten_tomatoes --max-length 64 --train-samples 3000)
base="$runs/minilm-rt"
if [ ! -f "$base/config.json" ]; then
  "$cli" finetune --model all-MiniLM-L6-v2 --out "$base" --epochs 1 "${data[@]}"
fi
"$cli" compress --model "$base" --method fwsvd --ratio 0.5 --out "$runs/minilm-rt-fwsvd-0.5" --overwrite "${data[@]}"
"$cli" compress --model "$base" --method svd --ratio 0.5 --out "$runs/minilm-rt-svd-0.5" --overwrite "${data[@]}"
"$cli" finetune --model "$runs/minilm-rt-fwsvd-0.5" --out "$runs/minilm-rt-fwsvd-0.5-recovered" --epochs 1 \
  --overwrite "${data[@]}"
echo "reports: $runs/minilm-rt-fwsvd-0.5/compression_report.md, $runs/minilm-rt-svd-0.5/compression_report.md"
