"""``manifest.json``: what every output folder carries to tie it to its inputs."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from .modeling import package_versions

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_FINGERPRINTED = (".json", ".safetensors", ".onnx", ".onnx_data", ".txt", ".model")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of the model, config and tokenizer files of a folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _FINGERPRINTED
                       and p.name != MANIFEST_FILE):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def write_manifest(folder: Path, content: dict[str, Any]) -> Path:
    data = {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        **content,
    }
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
